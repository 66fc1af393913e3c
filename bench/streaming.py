"""Streaming the corpus: `crowdtrain init`'s peak memory and time on a ~100 MB and a ~1 GB corpus.

`crowdtrain init` reads the corpus a piece at a time (crowdtrain.run.sources) and writes token
shards as they fill (crowdtrain.run.data.build_shards), so its memory should not grow with the
corpus. This generates corpora of text documents (random passages of the bundled Tiny
Shakespeare, 200-4000 characters each; .jsonl, .parquet or one .txt file), and runs
`crowdtrain init` on each in a child process of its own: a given tokenizer.json (a 4096-token
BPE trained once on the bundled corpus, so that tokenizer training does not dominate), the tiny
preset, no warm start. Each child's peak RSS comes from the kernel (`os.wait4`'s ru_maxrss) and
its wall time from the clock around it; a ~1 MB corpus gives the baseline (what init costs
without data: torch, the model, the tokenizer).

Targets: peak RSS grows by at most 1 GB over the baseline at every size, and by about as much
for both corpora (the 1 GB run's peak RSS / the 100 MB run's, close to 1).

    python bench/streaming.py                        # 1M (baseline), 100M, 1G of .jsonl
    python bench/streaming.py --sizes 1M,20M --format parquet --no-write
    python bench/streaming.py --via python           # init_run in `python -c` instead of the CLI
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load, machine  # noqa: E402

from crowdtrain.run.data import DataConfig, default_corpus, train_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.md"
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
RSS_GROWTH_LIMIT_MB = 1024
RATIO_LIMIT = 1.25  # "close to 1": the largest corpus' peak RSS / the second largest's


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def documents(seed: int):
    """Endless random passages of the bundled corpus, 200-4000 characters each."""
    text = default_corpus().read_text(encoding="utf-8")
    rng = random.Random(seed)
    while True:
        a = rng.randrange(len(text) - 4000)
        yield text[a: a + rng.randrange(200, 4000)]


def make_corpus(folder: Path, size: int, fmt: str, seed: int = 0) -> tuple[Path, int]:
    """A corpus of about `size` bytes in format `fmt`; (path, documents). Reused if present."""
    path = folder / f"corpus-{size}.{fmt}"
    meta = path.with_suffix(path.suffix + ".docs")
    if path.exists() and meta.exists():
        return path, int(meta.read_text())
    tmp = path.with_name(path.name + ".tmp")
    n = written = 0
    docs = documents(seed)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(tmp, schema) as w:
            while written < size:
                batch = [next(docs) for _ in range(200)]
                w.write_table(pa.table({"text": batch}, schema=schema))
                n += len(batch)
                written += sum(len(d.encode("utf-8")) for d in batch)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            while written < size:
                d = next(docs)
                line = json.dumps({"text": d}) + "\n" if fmt == "jsonl" else d + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n += 1
    os.replace(tmp, path)
    meta.write_text(str(n if fmt != "txt" else 1))
    return path, int(meta.read_text())


def init_command(run_dir: Path, corpus: Path, tokenizer: Path, via: str) -> list[str]:
    """The child's command: `crowdtrain init` ("cli"), init_run in `python -c` ("python"), or
    only what turns the corpus into shards ("shards": check_sources + build_shards)."""
    if via == "cli":
        return [sys.executable, "-m", "crowdtrain", "init", str(run_dir), "--data", str(corpus),
                "--tokenizer", str(tokenizer), "--preset", "tiny", "--warm-start", "0", "-q"]
    if via == "python":
        code = ("import sys; from crowdtrain.run.folder import SwarmConfig, init_run; "
                "init_run(sys.argv[1], [sys.argv[2]], preset='tiny', tokenizer=sys.argv[3], "
                "progress=False, swarm=SwarmConfig(warm_start=0.0))")
    else:
        code = ("import sys; from crowdtrain.run.data import DataConfig, build_shards, "
                "check_sources, load_tokenizer; build_shards(check_sources([sys.argv[2]]), "
                "load_tokenizer(sys.argv[3]), sys.argv[1] + '/data', DataConfig(), "
                "progress=False)")
    return [sys.executable, "-c", code, str(run_dir), str(corpus), str(tokenizer)]


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process; its failure ends the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # read the pipes while it runs, then reap it with its own resource usage
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{out.decode()}"
                 f"{err.decode()}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_mode(folder: Path, sizes: list[int], fmt: str, tokenizer: Path, via: str,
             keep: bool) -> dict:
    """Every size in one mode: the rows, the markdown table and the verdict lines."""
    print(f"\n## {VIA[via]}", flush=True)
    rows = []
    for size in [10**6, *sizes]:
        t0 = time.perf_counter()
        corpus, docs = make_corpus(folder, size, fmt)
        made = time.perf_counter() - t0
        run_dir = folder / f"run-{size}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        wall, rss = measure(init_command(run_dir, corpus, tokenizer, via))
        index = json.loads((run_dir / "data" / "index.json").read_text())
        tokens = sum(e["tokens"] for e in index["train"] + index["val"])
        mb = corpus.stat().st_size / 1e6
        rows.append({"size": size, "mb": mb, "docs": docs, "tokens": tokens,
                     "shards": len(index["train"]) + len(index["val"]), "wall": wall,
                     "rss": rss})
        print(f"{mb:9.1f} MB {fmt}: {docs:,} documents, {tokens:,} tokens, child "
              f"{wall:.1f} s ({mb / wall:.2f} MB/s), peak RSS {rss:.0f} MB "
              f"(corpus ready in {made:.0f} s)", flush=True)
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    base = rows[0]["rss"]
    growth = [r["rss"] - base for r in rows]
    table = ["| corpus | documents | tokens | shards | wall | MB/s | peak RSS | growth over "
             "the 1 MB baseline |", "|---|---|---|---|---|---|---|---|"]
    for r, g in zip(rows, growth, strict=True):
        table.append(f"| {r['mb']:,.1f} MB {fmt} | {r['docs']:,} | {r['tokens']:,} | "
                     f"{r['shards']:,} | {r['wall']:.1f} s | {r['mb'] / r['wall']:.2f} | "
                     f"{r['rss']:,.0f} MB | {g:+,.0f} MB |")
    verdict = [f"- peak RSS growth at most {RSS_GROWTH_LIMIT_MB} MB over the baseline at every "
               f"size: {'met' if max(growth) <= RSS_GROWTH_LIMIT_MB else 'NOT met'} (largest "
               f"{max(growth):+,.0f} MB)"]
    if len(rows) > 2:
        ratio = rows[-1]["rss"] / rows[-2]["rss"]
        verdict.append(
            f"- the largest corpus' peak RSS / the next one's, close to 1 (at most "
            f"{RATIO_LIMIT}): {'met' if ratio <= RATIO_LIMIT else 'NOT met'} ({ratio:.3f} for "
            f"{rows[-1]['mb']:,.0f} MB vs {rows[-2]['mb']:,.0f} MB)")
    print("\n" + "\n".join(table + [""] + verdict), flush=True)
    return {"via": via, "rows": rows, "table": table, "verdict": verdict}


VIA = {"cli": "`crowdtrain init`", "python": "init_run in `python -c`",
       "shards": "the data alone: check_sources + build_shards in `python -c`"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100M,1G", help="corpus sizes after the 1M baseline")
    ap.add_argument("--format", default="jsonl", choices=("jsonl", "parquet", "txt"))
    ap.add_argument("--dir", type=Path, help="where corpora and runs go (default: a temp dir, "
                                             "removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the runs")
    ap.add_argument("--via", default="cli,shards",
                    help="the children, comma-separated: cli (`crowdtrain init`), python "
                         "(init_run in `python -c`), shards (check_sources + build_shards)")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    modes = a.via.split(",")
    if not set(modes) <= set(VIA):
        ap.error(f"--via: choose from {', '.join(VIA)}")
    folder = a.dir or Path(tempfile.mkdtemp(prefix="crowdtrain-streaming-"))
    folder.mkdir(parents=True, exist_ok=True)
    started, start_load = time.strftime("%Y-%m-%d %H:%M"), load()
    print(f"# streaming: crowdtrain init's peak RSS and time\n# machine: {machine()}\n"
          f"# {start_load} at start, {started}; corpora in {folder}", flush=True)
    tokenizer = folder / "tokenizer.json"
    train_tokenizer([default_corpus()], DataConfig(vocab_size=4096)).save(str(tokenizer))
    results = [run_mode(folder, sizes, a.format, tokenizer, via, a.keep) for via in modes]
    if a.dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    if a.no_write:
        return
    lines = ["# Streaming the corpus: `crowdtrain init` on 100 MB and 1 GB", "",
             (__doc__ or "").split("\n\n")[1].replace("\n", " ").strip(), "",
             f"Machine: {machine()}; shared with other sessions' jobs ({start_load} at the "
             f"start, {load()} at the end). Run {started}.", "", "```bash",
             ("python bench/streaming.py " + " ".join(sys.argv[1:])).strip(), "```"]
    for r in results:
        cmd = " ".join(init_command(Path("RUN"), Path("CORPUS"), Path("TOK"), r["via"])[1:])
        lines += ["", f"## {VIA[r['via']]}", "", f"Each child: `python {cmd}`", "",
                  *r["table"], "", "Targets:", "", *r["verdict"]]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"\nwritten: {RESULTS}")


if __name__ == "__main__":
    main()
