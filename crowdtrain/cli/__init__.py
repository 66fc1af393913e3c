"""The `crowdtrain` command: argument parsers (`main`), what each subcommand does
(`commands`), the demo (`demo`), the owner's admin commands (`admin`), `crowdtrain status`
(`status`), and a swarm of real processes on this machine (`processes`, for the demo, the
tests and the benchmarks). The top layer: it may import every other package."""
