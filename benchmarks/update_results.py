"""Run `lmlab bench` and put its report into benchmarks/RESULTS.md, in the section of this device.

    python benchmarks/update_results.py                      # CPU section (train.device=cpu)
    python benchmarks/update_results.py train.device=cuda train.precision=bf16 train.compile=true
                                                             # GPU section

Each section sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers
(NAME = cpu or gpu) and holds the command that made it, the machine and the
tables; the rest of RESULTS.md (the summary written by people) is left as is.
The rows also go to benchmarks/results-NAME.json.
"""

import re
import shlex
import sys
from pathlib import Path

from lmlab import atomic
from lmlab.bench.suite import run, write_json
from lmlab.config import load_config
from lmlab.device import resolve_device

HERE = Path(__file__).resolve().parent


def main(argv):
    config = load_config(None, argv)
    name = "gpu" if resolve_device(config.train.device).type == "cuda" else "cpu"
    report, rows = run(config)
    command = shlex.join(["python", "benchmarks/update_results.py", *argv])
    section = f"<!-- {name}:start -->\nCommand: `{command}`\n\n{report}<!-- {name}:end -->"
    results = HERE / "RESULTS.md"
    text = results.read_text(encoding="utf-8")
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- {name}:start --> ... <!-- {name}:end --> markers in {results}")
    atomic.write_text(results, pattern.sub(lambda _: section, text))
    write_json(HERE / f"results-{name}.json", rows)
    print(f"{name} section of {results} updated")


if __name__ == "__main__":
    main(sys.argv[1:])
