#!/usr/bin/env bash
# On the GPU machine: checks and times variants of the CUDA self-tests built
# off the device by scripts/build_tools.sh (one folder a variant).
#
#   scripts/ab_check.sh DIR [REPS]
#
# DIR/main is the baseline; every other folder of DIR is a variant. Steps:
#  1. every variant's full self-tests, side by side (correctness; not timed);
#  2. the quick self-tests under compute-sanitizer memcheck and racecheck, for
#     the variants named in AB_SANITIZE (default: all but main), side by side;
#  3. REPS rounds (default 2) of every variant's --bench, variants alternating
#     within a round (ABAB), one process at a time;
#  4. the phase probe (--phases) of any variant that has one.
# Logs go to $OUT/ab_logs and are packed into $OUT/ab_logs.tgz (a device run
# returns few files); unpack them here and compare with
# `python3 scripts/ab_compare.py ab_logs`. AB_STEPS (default "check sanitize
# bench phases") picks steps, so that a call can run the checks beside other
# GPU work and the timed steps alone; logs of later calls add to ab_logs.tgz.
set -uo pipefail
dir="${1:?usage: scripts/ab_check.sh DIR [REPS]}"
reps="${2:-2}"
OUT="${OUT:-$PWD/ab_out}"
logs="$OUT/ab_logs"
mkdir -p "$logs"
steps=" ${AB_STEPS:-check sanitize bench phases} "
has() { [[ $steps == *" $1 "* ]]; }
[[ -f "$OUT/ab_logs.tgz" ]] && (cd "$OUT" && tar xzf ab_logs.tgz)
pack() { (cd "$OUT" && tar czf ab_logs.tgz ab_logs && rm -rf ab_logs); }
trap pack EXIT
mapfile -t variants < <(cd "$dir" && ls -d */ | tr -d / | sort)
[[ " ${variants[*]} " == *" main "* ]] || { echo "ab_check.sh: $dir/main (the baseline) is missing" >&2; exit 2; }
# main first, then the others in name order.
ordered=(main)
for v in "${variants[@]}"; do [[ $v != main ]] && ordered+=("$v"); done
sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$logs/gpu.txt" 2>&1
# run LOG CMD...: CMD's output to LOG, then its exit status and seconds.
run() {
  local log="$1" t0=$SECONDS
  shift
  timeout 400 "$@" > "$logs/$log" 2>&1
  echo "rc=$? $((SECONDS - t0))s" >> "$logs/$log"
}
tools=(marlin_selftest sparse_selftest)

if has check; then
  for v in "${ordered[@]}"; do
    for t in "${tools[@]}"; do
      [[ -x "$dir/$v/$t" ]] && run "${v}_${t}.log" "$dir/$v/$t" &
    done
  done
  wait
fi

sanitize_list="${AB_SANITIZE:-${ordered[*]:1}}"
has sanitize || sanitize_list=""
for v in $sanitize_list; do
  for t in "${tools[@]}"; do
    [[ -x "$dir/$v/$t" ]] || continue
    for tool in memcheck racecheck; do
      run "san_${tool}_${v}_${t}.log" "$sanitizer" --tool "$tool" --error-exitcode 1 "$dir/$v/$t" --quick &
    done
  done
done
wait

has bench || reps=0
for ((r = 1; r <= reps; r++)); do
  for t in "${tools[@]}"; do
    for v in "${ordered[@]}"; do
      [[ -x "$dir/$v/$t" ]] && run "bench_${t}_${v}_r$r.log" "$dir/$v/$t" --bench
    done
  done
done

has phases || ordered=()
for v in "${ordered[@]}"; do
  [[ -x "$dir/$v/marlin_phase_probe" ]] && run "phases_$v.log" "$dir/$v/marlin_phase_probe" --phases
done
# One line a log: its last lines say pass/fail and the exit status.
for f in "$logs"/*.log; do echo "$(basename "$f"): $(tail -n 2 "$f" | tr '\n' ' ')"; done > "$logs/summary.txt"
cat "$logs/summary.txt"
