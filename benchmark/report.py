"""Write a static HTML gallery of a benchmark run: ``python benchmark/report.py SAVE_PATH``.

One card per video, filterable by category, in ``SAVE_PATH/index.html``. The prompt-suite runner
writes it at the end of every run; this rebuilds it. After a run split with ``--shard K/N`` it
first merges the shards' summary parts into one ``summary.json`` (``stepvideo.shards``); the
gallery reads every manifest part. The page itself is ``stepvideo/gallery.py``.
"""

import argparse
import sys

from stepvideo.gallery import write_gallery
from stepvideo.shards import write_merged_summary
from stepvideo.suite import SuiteError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write SAVE_PATH/index.html, a static gallery of a "
                                            "benchmark run (one card per video, filterable by "
                                            "category).")
    p.add_argument("save_path", help="the --save_path of benchmark/run_benchmark.py")
    a = p.parse_args(argv)
    try:
        merged = write_merged_summary(a.save_path)
        path = write_gallery(a.save_path)
    except (FileNotFoundError, SuiteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if merged:
        print(f"wrote {merged} (merged from the shards' summaries)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
