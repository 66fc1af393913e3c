"""torchrun's entry point for a volunteer of several processes, as the README documents:
`torchrun --nproc-per-node N -m crowdtrain.worker URL [join options]`. A thin shim over
`crowdtrain join`; the volunteer itself lives in crowdtrain.volunteer."""

import sys

if __name__ == "__main__":
    from crowdtrain.cli.main import main

    sys.exit(main(["join", *sys.argv[1:]]))
