#!/usr/bin/env bash
# The GSM8K SORSA recipe on several GPUs through `lightning run`, as docs/distributed.md reports it:
#   ddp        2 GPUs, one node (DDP: lit_svd's AdapterDDPStrategy)
#   ddp-bf16grads  the same with the gradient all-reduce in bf16 (AdapterDDPStrategy(gradient_dtype=...))
#   ddp-opts   the same with AdapterDDPStrategy options from DDP_OPTIONS (environment), e.g.
#              DDP_OPTIONS="--trainer.strategy.bucket_cap_mb 2048 --trainer.strategy.gradient_as_bucket_view true"
#   fsdp       2 GPUs, one node (lit_svd's FSDP2: --strategy fsdp)
#   multinode  2 "nodes" of 1 GPU on this host (--num-nodes 2 --node-rank {0,1}, one GPU each)
#   single     1 GPU (the scaling baseline; the same global batch: 2x the per-device batch; GPU
#              SINGLE_GPU, default 0)
#   resume-R   resume run R (ddp, fsdp or single) from its last checkpoint and train to RESUME_STEPS
#              (environment; default: 10 more steps than R's summary says it ran)
# Each run trains, evaluates by generation, checkpoints and exports (merged + PEFT); its summary.json,
# log and the GPUs' peak memory (nvidia-smi, sampled every 200 ms) go to OUT_DIR/<run>.
#
# Usage: bench/distributed_recipes.sh MODEL_DIR DATA_DIR OUT_DIR RUNS [recipe args...]
#   e.g. bench/distributed_recipes.sh /tmp/smol ../shared/data/gsm8k /tmp/out "ddp fsdp" --trainer.max_steps 20
set -uo pipefail
model=$1 data=$2 out=$3 runs=$4
shift 4
batch=$(python3 -c "import sys; a=sys.argv[1:]; print(a[a.index('--data.batch_size')+1] if '--data.batch_size' in a else 8)" "$@")
# Each log line gets the seconds since its run started, so the logs show where the wall time goes.
stamp() { python3 -u -c '
import sys, time
start = time.time()
for line in sys.stdin:
    print(f"{time.time() - start:7.1f}s {line}", end="", flush=True)'; }
common=(--model.model "$model" --model.model_dtype bfloat16 --data.data_dir "$data")
for run in $runs; do
    dir=$out/$run
    mkdir -p "$dir"
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$dir/memory.csv" &
    smi=$!
    args=("${common[@]}" --trainer.default_root_dir "$dir" --trainer.logger.init_args.save_dir "$dir/runs"
          --export.merged_dir "$dir/merged" --export.peft_dir "$dir/peft" "$@")
    start=$(date +%s.%N)
    case $run in
        ddp|fsdp)
            lightning run --devices 2 --strategy "$run" --precision bf16-mixed recipes/gsm8k_sorsa.py "${args[@]}" \
                2>&1 | stamp >"$dir/log" ;;
        ddp-bf16grads|ddp-opts)
            options=(--trainer.strategy.gradient_dtype bfloat16)
            # shellcheck disable=SC2206  # DDP_OPTIONS is a list of words
            [ "$run" = ddp-opts ] && options=(${DDP_OPTIONS:-})
            python3 -m torch.distributed.run --nproc_per_node 2 recipes/gsm8k_sorsa.py "${args[@]}" \
                --trainer.accelerator gpu --trainer.devices 2 --trainer.precision bf16-mixed \
                --trainer.strategy lit_svd.strategies.AdapterDDPStrategy "${options[@]}" \
                2>&1 | stamp >"$dir/log" ;;
        multinode)
            nodes=()
            for node in 0 1; do
                (set -o pipefail; CUDA_VISIBLE_DEVICES=$node lightning run --num-nodes 2 --node-rank $node \
                    --main-address 127.0.0.1 --main-port 29517 --devices 1 --strategy ddp --precision bf16-mixed \
                    recipes/gsm8k_sorsa.py "${args[@]}" 2>&1 | stamp >"$dir/log$node") &
                nodes+=($!)
            done
            wait "${nodes[0]}"; status0=$?; wait "${nodes[1]}"; [ $status0 -eq 0 ] ;;
        single)
            CUDA_VISIBLE_DEVICES=${SINGLE_GPU:-0} lightning run --devices 1 --precision bf16-mixed recipes/gsm8k_sorsa.py \
                "${args[@]}" --data.batch_size $((2 * batch)) 2>&1 | stamp >"$dir/log" ;;
        resume-*)
            from=${run#resume-}
            read -r ckpt steps < <(python3 -c "
import json, pathlib, sys
s = json.loads(next(pathlib.Path(sys.argv[1]).rglob('summary.json')).read_text())
print(s['paths']['checkpoint'], s['steps'])" "$out/$from")
            steps=${RESUME_STEPS:-$((steps + 10))}
            devices=(--devices 2 --strategy "$from")
            extra=()
            if [ "$from" = single ]; then devices=(--devices 1); extra=(--data.batch_size $((2 * batch))); fi
            lightning run "${devices[@]}" --precision bf16-mixed recipes/gsm8k_sorsa.py "${args[@]}" "${extra[@]}" \
                --ckpt_path "$ckpt" --trainer.max_steps "$steps" 2>&1 | stamp >"$dir/log" ;;
    esac
    status=$?
    kill $smi 2>/dev/null
    seconds=$(python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1])))" "$start")
    peak=$(python3 -c "
import sys, collections
peak = collections.defaultdict(int)
for line in open(sys.argv[1]):
    i, mib = line.split(',')
    peak[int(i)] = max(peak[int(i)], int(mib))
print(' '.join(f'gpu{i}={m / 1024:.1f}GiB' for i, m in sorted(peak.items())))" "$dir/memory.csv")
    echo "== $run: exit $status, ${seconds}s wall, peak memory $peak"
    grep -hE "SVDInit|AdapterFSDP|tokens/s|accuracy|error|Error|written|identical|s time " "$dir"/log* | grep -v Warning | head -20
    python3 - "$dir" <<'PY'
import json, pathlib, sys
for path in pathlib.Path(sys.argv[1]).rglob("summary.json"):
    s = json.loads(path.read_text())
    # No checkpoint (--trainer.enable_checkpointing false): size 0, not the size of the working directory.
    ckpt = pathlib.Path(s["paths"]["checkpoint"]) if s["paths"].get("checkpoint") else None
    files = [] if ckpt is None else [ckpt] if ckpt.is_file() else ckpt.rglob("*")
    size = sum(f.stat().st_size for f in files)
    keep = {k: s.get(k) for k in ("steps", "train_seconds", "train_tokens", "tokens_per_second",
                                  "steady_tokens_per_second", "svd_init_seconds", "train_loss", "seconds")}
    print(json.dumps(keep | {"eval": s.get("eval"), "checkpoint_mb": round(size / 2**20, 1), "checkpoint": str(ckpt)}))
PY
done
