"""Write a static HTML gallery of a benchmark run: ``python benchmark/report.py SAVE_PATH``.

One card per video, filterable by category, in ``SAVE_PATH/index.html``. The prompt-suite runner
writes it at the end of every run; this rebuilds it. The page itself is ``stepvideo/gallery.py``.
"""

import argparse
import sys

from stepvideo.gallery import write_gallery


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write SAVE_PATH/index.html, a static gallery of a "
                                            "benchmark run (one card per video, filterable by "
                                            "category).")
    p.add_argument("save_path", help="the --save_path of benchmark/run_benchmark.py")
    a = p.parse_args(argv)
    try:
        path = write_gallery(a.save_path)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
