#!/usr/bin/env bash
# The CUDA check, for a machine with one GPU and mmkd installed (see README, "Many GPUs"):
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh [--with-text DATA_ROOT]
# 1. training throughput (samples/s) of student-only training and of distillation with a live
#    and a cached teacher (benchmarks/throughput.py, experiment demo_bind), in bf16-mixed and
#    in 32-true;
# 2. a 2-epoch run under Lightning's DDP strategy on the one GPU against the same run without
#    it (same seed): both must finish and their metrics are written side by side;
# 3. with --with-text, the text benchmark's --full protocol on SST-2 (seed 0), as far as the
#    caller's time limit lets it go (it resumes).
# Each step writes under $OUT; a failed step is reported and the next one still runs.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute, then run from the repository root
cd "$(dirname "$0")/.."
status=0
step() { echo "== $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
for precision in bf16-mixed 32-true; do
  step python benchmarks/throughput.py --accelerator gpu --precision "$precision" \
    --epochs 2 --json "$OUT/throughput_$precision.json"
done
common=(trainer=gpu trainer.max_epochs=2 trainer.enable_progress_bar=false run.seed=0
  run.export=false)
step python train.py "${common[@]}" run.dir="$OUT/single"
step python train.py "${common[@]}" trainer.strategy=ddp run.dir="$OUT/ddp1"
python - "$OUT" <<'PY' | tee "$OUT/ddp_vs_single.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("single", "ddp1"):
    path = out / name / "metrics.json"
    print(name, json.loads(path.read_text()) if path.exists() else "missing")
PY
if [[ "${1:-}" == "--with-text" ]]; then
  step python benchmarks/text.py --task sst2 --full --seeds 0 --data-root "$2" \
    --out "$OUT/text_sst2_full"
fi
exit $status
