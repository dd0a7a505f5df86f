"""Billsum-length documents from the embedded corpus, for GPU sweeps that should have the recipe's shapes.

The embedded stdlib-docstring pairs are short (a function in, its docstring's first line out), so a
T5-3b step on them is bound by kernel launches, not by the GPU. Billsum's bills fill the recipe's
1024 source tokens and its summaries its 128 target tokens. This joins consecutive functions of one
module into a document of at least --min-chars characters, summarized by their docstring lines in
order: the same shapes, a task the model can learn. Writes JSONL with `text` and `summary` columns.

    python3 bench/long_documents.py /tmp/long-docs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from itertools import groupby
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--min-chars", type=int, default=5000, help="source characters per document (~4 per token)")
    args = ap.parse_args()
    from qlora_ray import embedded

    cache = Path(os.environ.get("QLORA_RAY_CACHE", "/tmp/qlora-ray-cache"))
    rows = [json.loads(line) for line in embedded.build_corpus(cache).read_text().splitlines()]
    docs = []
    for _, group in groupby(sorted(rows, key=lambda r: (r["split"], r["module"])),
                                           key=lambda r: (r["split"], r["module"])):
        text, summary = [], []
        for row in group:
            text.append(row["text"])
            summary.append(row["summary"])
            if sum(map(len, text)) >= args.min_chars:
                docs.append({"text": "\n\n".join(text), "summary": " ".join(summary)})
                text, summary = [], []
    args.out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"{len(docs)} documents -> {args.out}")


if __name__ == "__main__":
    main()
