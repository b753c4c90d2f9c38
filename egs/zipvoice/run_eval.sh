#!/usr/bin/env bash
# Objective evaluation of generated speech, like upstream's egs/zipvoice/run_eval.sh: speaker
# similarity to the prompt, predicted quality (DNSMOS, UTMOS), intelligibility (CER/WER) and
# Japanese pitch accent, over one folder of <name>.wav made from an inference test list.
#
#   bash egs/zipvoice/run_eval.sh --test-list data/test.tsv --res-dir exp/results
#   bash egs/zipvoice/run_eval.sh --stage 1 --use-upstream-models 1 --metrics sim,utmos,cer \
#       --test-list data/test.tsv --res-dir exp/results
#   bash egs/zipvoice/run_eval.sh --stage 2 --model-dir download/zipvoice \
#       --test-list data/test.tsv --res-dir exp/results      # synthesise first, then score
#
# Stages:
#   1  download upstream's evaluation models (k2-fsa/TTS_eval_models; only with
#      --use-upstream-models 1: needed for upstream-comparable SIM-o, UTMOS and ASR)
#   2  synthesise the test list with zipvoice.bin.infer_zipvoice (only when --model-dir is given)
#   3  score res_dir with every metric in --metrics; one table on stdout, tsv files in score_dir
#
# The default metrics (sim, dnsmos) run offline with models shipped in their wheels. Each line
# of the test list is name<TAB>prompt_text<TAB>prompt_wav<TAB>text. See docs/evaluation.md.

set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd -- "$script_dir/../.." && pwd)

knobs=(
  stage stop_stage python test_list res_dir score_dir metrics metric_opts overwrite
  use_upstream_models download_dir eval_models_repo model_name model_dir infer_extra_args
)
stage=${stage:-2}
stop_stage=${stop_stage:-3}
if [ -x "$repo_root/.venv/bin/python" ]; then
  python=${python:-$repo_root/.venv/bin/python}
else
  python=${python:-python3}
fi
test_list=${test_list:-}
res_dir=${res_dir:-}
score_dir=${score_dir:-}               # default: $res_dir/scores
# metrics from: sim dnsmos utmos cer wer f0_corr f0_rmse vuv_error accent_probe (evaluate --help)
metrics=${metrics:-sim,dnsmos}
metric_opts=${metric_opts:-}           # space-separated key=value options for the scorers
overwrite=${overwrite:-0}              # 1: replace earlier scores in score_dir
use_upstream_models=${use_upstream_models:-0}
download_dir=${download_dir:-download}
eval_models_repo=${eval_models_repo:-k2-fsa/TTS_eval_models}
model_name=${model_name:-zipvoice}
model_dir=${model_dir:-}               # a ZipVoice model folder, for stage 2
infer_extra_args=${infer_extra_args:-}

die() {
  echo "error: $*" >&2
  exit 1
}
log() { echo -e "$(date '+%Y-%m-%d %H:%M:%S') (run_eval.sh) $*"; }
usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  local knob
  for knob in "${knobs[@]}"; do printf '  --%-22s %s\n' "${knob//_/-}" "${!knob}"; done
}
is_knob() {
  local knob
  for knob in "${knobs[@]}"; do [ "$knob" = "$1" ] && return 0; done
  return 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --*=*) name=${1%%=*}; value=${1#*=}; shift ;;
    --*) [ $# -ge 2 ] || die "$1 needs a value"; name=$1; value=$2; shift 2 ;;
    *) die "unexpected argument '$1' (flags are --name value; see --help)" ;;
  esac
  name=${name#--}
  name=${name//-/_}
  is_knob "$name" || die "unknown option --${name//_/-} (see --help)"
  printf -v "$name" '%s' "$value"
done

[ -n "$test_list" ] || die "give --test-list (name<TAB>prompt_text<TAB>prompt_wav<TAB>text)"
[ -n "$res_dir" ] || die "give --res-dir (the folder of generated <name>.wav)"
score_dir=${score_dir:-$res_dir/scores}
eval_models_dir=$download_dir/tts_eval_models
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
command -v "$python" > /dev/null 2>&1 || die "python '$python' not found (set --python)"
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

if run_stage 1 && [ "$use_upstream_models" = 1 ]; then
  log "Stage 1: download $eval_models_repo to $eval_models_dir"
  "$python" -c 'import sys; from huggingface_hub import snapshot_download as d
d(repo_id=sys.argv[1], local_dir=sys.argv[2])' "$eval_models_repo" "$eval_models_dir"
fi

if run_stage 2 && [ -n "$model_dir" ]; then
  log "Stage 2: synthesise $test_list into $res_dir"
  read -r -a extra <<< "$infer_extra_args"
  "$python" -m zipvoice.bin.infer_zipvoice \
    --model-name "$model_name" --model-dir "$model_dir" \
    --test-list "$test_list" --res-dir "$res_dir" ${extra[@]+"${extra[@]}"}
fi

if run_stage 3; then
  log "Stage 3: score $res_dir ($metrics)"
  args=(--wav-path "$res_dir" --test-list "$test_list" --metrics "$metrics" --output-dir "$score_dir")
  [ "$use_upstream_models" = 1 ] && args+=(--model-dir "$eval_models_dir")
  [ "$overwrite" = 1 ] && args+=(--overwrite)
  for opt in $metric_opts; do args+=(--opt "$opt"); done
  "$python" -m zipvoice.bin.evaluate "${args[@]}"
  log "Scores written to $score_dir"
fi
