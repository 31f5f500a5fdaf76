"""Average the weights of model folders of one architecture into a new model folder.

    python benchmarks/average_models.py OUT_DIR MODEL_DIR MODEL_DIR [...]

Floating-point tensors (weights, batch-norm statistics) are averaged with equal weights; integer
buffers are taken from the last folder; config.json and thresholds.json from the first. Used to
try weight averaging of runs that share an ancestor (fine-tuned from the same weights).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, sources = Path(sys.argv[1]), [Path(s) for s in sys.argv[2:]]
    states = [load_file(str(s / "weights.safetensors")) for s in sources]
    if any(set(s) != set(states[0]) for s in states):
        sys.exit("the folders do not hold the same architecture (their tensors differ)")
    out.mkdir(parents=True, exist_ok=True)
    mean = {k: (sum(s[k] for s in states) / len(states)) if states[0][k].is_floating_point() else states[-1][k]
            for k in states[0]}
    save_file(mean, str(out / "weights.safetensors"))
    shutil.copy(sources[0] / "thresholds.json", out / "thresholds.json")
    config = json.loads((sources[0] / "config.json").read_text())
    config.update(name=out.name, default=False, averaged_from=[str(s) for s in sources])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{out}: mean of {len(sources)} folders")


if __name__ == "__main__":
    main()
