#!/usr/bin/env bash
# Adapt pretrained ZipVoice to Japanese with LoRA/DoRA adapters, from a tsv corpus to an
# adapted voice in PyTorch and in ONNX.
#
#   bash egs/zipvoice/run_finetune_lora.sh                       # every stage, generated corpus
#   bash egs/zipvoice/run_finetune_lora.sh --stage 1 --stop-stage 3 \
#       --train-tsv data/raw/my_train.tsv --dev-tsv data/raw/my_dev.tsv
#   num_iters=2000 lora_rank=16 bash egs/zipvoice/run_finetune_lora.sh --stage 5
#
# Stages:
#   0  generate a small Japanese corpus with OpenJTalk (only when no --train-tsv is given)
#   1  tsv -> lhotse manifests (train, dev)
#   2  Japanese tokens with pitch-accent marks; the extended token file (base ids kept)
#   3  Vocos log-mel features
#   4  download the pretrained model and the vocoder (skipped for files already there)
#   5  LoRA/DoRA fine-tuning (rerun to resume)
#   6  synthesis with the adapter merged (PyTorch)
#   7  ONNX export with the adapter merged, synthesis with onnxruntime
#
# Every knob below can be set from the environment (`lora_rank=16 bash ...`) or with a flag
# (`--lora-rank 16`; dashes and underscores are the same). Relative paths are relative to the
# directory you run the script from. Each line of a tsv is `id<TAB>text<TAB>wav_path` (or with
# `<TAB>start<TAB>end` seconds); the part of the id before the first "_" is the speaker.
# See docs/lora.md for how to choose the adapter settings, and its section "Keeping the base
# model's voice" for replay (--replay-manifest), distillation (--kd-weight), partial freezing
# (--freeze-modules) and keeping the best checkpoint (--select-metric).

set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd -- "$script_dir/../.." && pwd)

# ---- Knobs -------------------------------------------------------------------------------------
knobs=(
  stage stop_stage python nj overwrite
  data_dir corpus_dir corpus_name num_speakers num_sentences train_tsv dev_tsv prefix
  download_dir hf_repo model_name model_dir vocoder_repo vocoder_path token_file
  exp_dir world_size use_fp16 num_workers max_duration min_len max_len
  lora_rank lora_alpha use_dora lora_dropout lora_target_modules lora_init use_rslora
  train_text_encoder base_lr num_iters valid_interval save_every_n log_interval
  forgetting_manifest wandb_project train_extra_args
  replay_manifest replay_ratio replay_tokenizer replay_lang kd_weight kd_on
  trainable_modules freeze_modules select_metric
  lora_scale lora_t_range text prompt_wav prompt_text test_list res_dir infer_extra_args
  onnx_dir onnx_int8
)

stage=${stage:-0}
stop_stage=${stop_stage:-7}
# The project's own environment (scripts/setup.sh) when there is one.
if [ -x "$repo_root/.venv/bin/python" ]; then
  python=${python:-$repo_root/.venv/bin/python}
else
  python=${python:-python3}
fi
nj=${nj:-4}                       # data preparation jobs
overwrite=${overwrite:-0}         # 1: redo stages 1-3 even when their outputs exist

# Data. With no train_tsv, stage 0 generates a corpus into corpus_dir and uses it.
data_dir=${data_dir:-data}
corpus_dir=${corpus_dir:-}        # default: $data_dir/raw
corpus_name=${corpus_name:-japanese}
num_speakers=${num_speakers:-4}
num_sentences=${num_sentences:-40}
train_tsv=${train_tsv:-}
dev_tsv=${dev_tsv:-}
prefix=${prefix:-ja}              # manifest names: ${prefix}_cuts_train.jsonl.gz, ...

# The pretrained model and vocoder (stage 4 fills these folders unless they are already there).
download_dir=${download_dir:-download}
hf_repo=${hf_repo:-k2-fsa/ZipVoice}
model_name=${model_name:-zipvoice}
model_dir=${model_dir:-}          # default: $download_dir/$model_name (model.pt, model.json, tokens.txt)
vocoder_repo=${vocoder_repo:-charactr/vocos-mel-24khz}
vocoder_path=${vocoder_path:-}    # default: $download_dir/vocos; "griffin-lim" needs no weights
token_file=${token_file:-}        # default: $data_dir/tokens_japanese_extended.txt

# Training.
exp_dir=${exp_dir:-exp/zipvoice_japanese_lora}
world_size=${world_size:-1}       # GPUs (DDP processes)
use_fp16=${use_fp16:-1}           # fp16 autocast on CUDA; ignored on CPU
num_workers=${num_workers:--1}  # -1: automatic, min(2, cores - 1)
max_duration=${max_duration:-280} # seconds of audio per batch: lower it when out of memory
min_len=${min_len:-1.0}
max_len=${max_len:-20}
lora_rank=${lora_rank:-32}
lora_alpha=${lora_alpha:-64}
use_dora=${use_dora:-1}
lora_dropout=${lora_dropout:-0.05}
lora_target_modules=${lora_target_modules:-attention}  # attention, attention_ff_conv, all_linear or names
lora_init=${lora_init:-default}
use_rslora=${use_rslora:-0}
train_text_encoder=${train_text_encoder:-1}
base_lr=${base_lr:-0.001}         # AdamW learning rate for the adapters
num_iters=${num_iters:-10000}
valid_interval=${valid_interval:-500}
save_every_n=${save_every_n:-2000}
log_interval=${log_interval:-50}
forgetting_manifest=${forgetting_manifest:-}  # cuts of the pretraining domain, to watch forgetting
# Against forgetting (docs/lora.md, "Keeping the base model's voice"); empty/0 = off.
replay_manifest=${replay_manifest:-}  # pretraining-domain cuts with fbank features, mixed in
replay_ratio=${replay_ratio:-0.1}     # share of each batch's duration that is replay
replay_tokenizer=${replay_tokenizer:-emilia}  # the base model's tokenizer, for replay text
replay_lang=${replay_lang:-en-us}     # espeak language, with replay_tokenizer=espeak
kd_weight=${kd_weight:-0}             # distillation from the start model (0: off)
kd_on=${kd_on:-replay}                # replay, prompt or all
trainable_modules=${trainable_modules:-}  # fnmatch patterns: only these parameters train
freeze_modules=${freeze_modules:-}    # fnmatch patterns: these parameters stay frozen
select_metric=${select_metric:-}      # e.g. valid_loss+0.5*forgetting_loss: keeps $exp_dir/best/
wandb_project=${wandb_project:-}
train_extra_args=${train_extra_args:-}        # more train_zipvoice flags, split on spaces

# Inference. The prompt defaults to the first utterance of the dev tsv.
lora_scale=${lora_scale:-1.0}
# Time-gated adapter: apply it only for flow times in [A,B), e.g. 0,0.5 (empty: always).
lora_t_range=${lora_t_range:-}
text=${text:-今日はとても良い天気ですね。}
prompt_wav=${prompt_wav:-}
prompt_text=${prompt_text:-}
test_list=${test_list:-}          # name<TAB>prompt_text<TAB>prompt_wav<TAB>text lines, instead
res_dir=${res_dir:-}              # default: $exp_dir/results
infer_extra_args=${infer_extra_args:-}
onnx_dir=${onnx_dir:-}            # default: $exp_dir/onnx
onnx_int8=${onnx_int8:-0}

# ---- Helpers -----------------------------------------------------------------------------------
log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

die() {
  echo "error: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "Knobs (flag form --name-with-dashes VALUE):"
  local knob
  for knob in "${knobs[@]}"; do
    printf '  --%-22s %s\n' "${knob//_/-}" "${!knob}"
  done
}

is_knob() {
  local knob
  for knob in "${knobs[@]}"; do
    [ "$knob" = "$1" ] && return 0
  done
  return 1
}

show_help=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      show_help=1
      shift
      continue
      ;;
    --*=*)
      name=${1%%=*}
      value=${1#*=}
      shift
      ;;
    --*)
      [ $# -ge 2 ] || die "$1 needs a value"
      name=$1
      value=$2
      shift 2
      ;;
    *)
      die "unexpected argument '$1' (flags are --name value; see --help)"
      ;;
  esac
  name=${name#--}
  name=${name//-/_}
  is_knob "$name" || die "unknown option --${name//_/-} (see --help)"
  printf -v "$name" '%s' "$value"
done

# Defaults that depend on other knobs.
corpus_dir=${corpus_dir:-$data_dir/raw}
model_dir=${model_dir:-$download_dir/$model_name}
vocoder_path=${vocoder_path:-$download_dir/vocos}
token_file=${token_file:-$data_dir/tokens_japanese_extended.txt}
res_dir=${res_dir:-$exp_dir/results}
onnx_dir=${onnx_dir:-$exp_dir/onnx}
generated_corpus=0
if [ -z "$train_tsv" ] && [ -z "$dev_tsv" ]; then
  generated_corpus=1
  train_tsv=$corpus_dir/${corpus_name}_train.tsv
  dev_tsv=$corpus_dir/${corpus_name}_dev.tsv
fi
if [ "$show_help" = 1 ]; then
  usage
  exit 0
fi
[ -n "$train_tsv" ] && [ -n "$dev_tsv" ] || die "give both --train-tsv and --dev-tsv (or neither)"
manifest_dir=$data_dir/manifests
fbank_dir=$data_dir/fbank
subsets=(train dev)

# Run from a checkout without installing: the package is found in the repository.
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
command -v "$python" > /dev/null 2>&1 || die "python '$python' not found (set --python)"

run_stage() {
  [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]
}

tsv_of() {
  if [ "$1" = train ]; then echo "$train_tsv"; else echo "$dev_tsv"; fi
}

# Prints the flag that replaces outputs when overwrite=1; returns 1 (skip) when the output
# exists and overwrite=0.
overwrite_flag_or_skip() {
  if [ ! -e "$1" ]; then
    return 0
  fi
  if [ "$overwrite" = 1 ]; then
    echo "--overwrite"
    return 0
  fi
  log "$1 exists: skipped (--overwrite 1 redoes it)" >&2
  return 1
}

# Download one file of a hub repository into a folder unless it is already there.
fetch_from_hub() {
  local repo=$1 filename=$2 dest_root=$3 dest=$3/$2
  if [ -f "$dest" ]; then
    log "$dest exists: not downloaded"
    return 0
  fi
  log "downloading $filename from $repo into $dest_root"
  # zipvoice.utils.hub: no retries for a minute when offline, one message naming the file.
  "$python" -c 'import sys
from zipvoice.utils.hub import hub_file
try:
    hub_file(sys.argv[1], sys.argv[2], instead=f"place it at {sys.argv[4]}", local_dir=sys.argv[3])
except (OSError, ValueError) as err:
    sys.exit(f"error: {err}")' \
    "$repo" "$filename" "$dest_root" "$dest" ||
    die "download of $repo/$filename failed; without a network, place the file at $dest"
}

# The first dev utterance as the prompt, unless --prompt-wav/--prompt-text are given.
choose_prompt() {
  if [ -n "$prompt_wav" ] && [ -n "$prompt_text" ]; then
    return 0
  fi
  [ -f "$dev_tsv" ] || die "no --prompt-wav/--prompt-text given and no dev tsv $dev_tsv to take one from"
  local id wav
  IFS=$'\t' read -r id prompt_text wav _ < "$dev_tsv" || true
  [ -n "${wav:-}" ] || die "cannot read a prompt from the first line of $dev_tsv"
  # Relative wav paths are relative to the current directory, else to the tsv (as in stage 1).
  if [ ! -f "$wav" ] && [ -f "$(dirname -- "$dev_tsv")/$wav" ]; then
    wav=$(dirname -- "$dev_tsv")/$wav
  fi
  prompt_wav=$wav
  log "prompt: $id ($prompt_wav): $prompt_text"
}

# ---- Stages ------------------------------------------------------------------------------------
if run_stage 0; then
  if [ "$generated_corpus" = 0 ]; then
    log "Stage 0: skipped (using $train_tsv and $dev_tsv)"
  elif [ -f "$train_tsv" ] && [ -f "$dev_tsv" ]; then
    log "Stage 0: $train_tsv exists: corpus not generated again"
  else
    log "Stage 0: generate a Japanese corpus with OpenJTalk into $corpus_dir"
    "$python" -m zipvoice.bin.generate_japanese_corpus \
      --output-dir "$corpus_dir" \
      --name "$corpus_name" \
      --num-speakers "$num_speakers" \
      --num-sentences "$num_sentences"
  fi
fi

if run_stage 1; then
  log "Stage 1: manifests from $train_tsv and $dev_tsv"
  for subset in "${subsets[@]}"; do
    tsv=$(tsv_of "$subset")
    [ -f "$tsv" ] || die "$subset tsv $tsv not found (run stage 0, or pass --${subset}-tsv)"
    out=$manifest_dir/${prefix}_cuts_raw_${subset}.jsonl.gz
    flag=$(overwrite_flag_or_skip "$out") || continue
    "$python" -m zipvoice.bin.prepare_dataset \
      --tsv-path "$tsv" \
      --prefix "$prefix" \
      --subset "raw_$subset" \
      --num-jobs "$nj" \
      --output-dir "$manifest_dir" \
      $flag
  done
fi

if run_stage 2; then
  log "Stage 2: token file (pretrained ids kept, Japanese tokens appended) and tokens"
  base_tokens=$model_dir/tokens.txt
  if [ "$model_dir" = "$download_dir/$model_name" ]; then
    fetch_from_hub "$hf_repo" "$model_name/tokens.txt" "$download_dir"
  fi
  [ -f "$base_tokens" ] || die "base token file $base_tokens not found"
  if flag=$(overwrite_flag_or_skip "$token_file"); then
    "$python" -m zipvoice.bin.prepare_token_file \
      --tokenizer japanese \
      --base-token-file "$base_tokens" \
      --output "$token_file" \
      $flag
  fi
  for subset in "${subsets[@]}"; do
    out=$manifest_dir/${prefix}_cuts_${subset}.jsonl.gz
    flag=$(overwrite_flag_or_skip "$out") || continue
    "$python" -m zipvoice.bin.prepare_tokens \
      --input-file "$manifest_dir/${prefix}_cuts_raw_${subset}.jsonl.gz" \
      --output-file "$out" \
      --tokenizer japanese \
      --token-file "$token_file" \
      --num-jobs "$nj" \
      $flag
  done
fi

if run_stage 3; then
  log "Stage 3: Vocos log-mel features"
  for subset in "${subsets[@]}"; do
    flag=$(overwrite_flag_or_skip "$fbank_dir/${prefix}_cuts_${subset}.jsonl.gz") || continue
    "$python" -m zipvoice.bin.compute_fbank \
      --source-dir "$manifest_dir" \
      --dest-dir "$fbank_dir" \
      --prefix "$prefix" \
      --subset "$subset" \
      --num-jobs "$nj" \
      $flag
  done
fi

if run_stage 4; then
  log "Stage 4: pretrained model ($hf_repo) and vocoder ($vocoder_repo)"
  if [ "$model_dir" = "$download_dir/$model_name" ]; then
    for file in model.pt model.json tokens.txt; do
      fetch_from_hub "$hf_repo" "$model_name/$file" "$download_dir"
    done
  fi
  for file in model.pt model.json tokens.txt; do
    [ -f "$model_dir/$file" ] || die "model folder $model_dir has no $file"
  done
  if [ "$vocoder_path" = griffin-lim ]; then
    log "vocoder: Griffin-Lim (no weights)"
  elif [ -f "$vocoder_path/config.yaml" ] &&
    { [ -f "$vocoder_path/pytorch_model.bin" ] || [ -f "$vocoder_path/model.safetensors" ]; }; then
    log "$vocoder_path holds a vocoder: not downloaded"
  else
    fetch_from_hub "$vocoder_repo" config.yaml "$vocoder_path"
    fetch_from_hub "$vocoder_repo" pytorch_model.bin "$vocoder_path"
  fi
fi

if run_stage 5; then
  log "Stage 5: LoRA/DoRA fine-tuning into $exp_dir (rerunning resumes)"
  optional_args=()
  [ -n "$forgetting_manifest" ] && optional_args+=(--forgetting-manifest "$forgetting_manifest")
  if [ -n "$replay_manifest" ]; then
    optional_args+=(--replay-manifest "$replay_manifest" --replay-ratio "$replay_ratio"
      --replay-tokenizer "$replay_tokenizer" --replay-lang "$replay_lang")
  fi
  optional_args+=(--kd-weight "$kd_weight" --kd-on "$kd_on")
  [ -n "$trainable_modules" ] && optional_args+=(--trainable-modules "$trainable_modules")
  [ -n "$freeze_modules" ] && optional_args+=(--freeze-modules "$freeze_modules")
  [ -n "$select_metric" ] && optional_args+=(--select-metric "$select_metric")
  # shellcheck disable=SC2206  # extra flags are meant to be split on spaces
  extra=($train_extra_args)
  "$python" -m zipvoice.bin.train_zipvoice \
    --world-size "$world_size" \
    --use-fp16 "$use_fp16" \
    --finetune 1 \
    --checkpoint "$model_dir/model.pt" \
    --model-config "$model_dir/model.json" \
    --use-lora 1 \
    --lora-rank "$lora_rank" \
    --lora-alpha "$lora_alpha" \
    --use-dora "$use_dora" \
    --lora-dropout "$lora_dropout" \
    --lora-target-modules "$lora_target_modules" \
    --lora-init "$lora_init" \
    --use-rslora "$use_rslora" \
    --train-text-encoder "$train_text_encoder" \
    --base-lr "$base_lr" \
    --num-iters "$num_iters" \
    --valid-interval "$valid_interval" \
    --save-every-n "$save_every_n" \
    --log-interval "$log_interval" \
    --max-duration "$max_duration" \
    --min-len "$min_len" \
    --max-len "$max_len" \
    --num-workers "$num_workers" \
    --tokenizer japanese \
    --token-file "$token_file" \
    --dataset custom \
    --train-manifest "$fbank_dir/${prefix}_cuts_train.jsonl.gz" \
    --dev-manifest "$fbank_dir/${prefix}_cuts_dev.jsonl.gz" \
    --exp-dir "$exp_dir" \
    --wandb-project "$wandb_project" \
    ${optional_args[@]+"${optional_args[@]}"} \
    ${extra[@]+"${extra[@]}"}
  log "adapter: $exp_dir/adapter"
fi

if run_stage 6; then
  log "Stage 6: synthesis with the adapter merged (PyTorch)"
  # shellcheck disable=SC2206
  extra=($infer_extra_args)
  common=(--tokenizer japanese --vocoder-path "$vocoder_path")
  if [ -n "$test_list" ]; then
    io=(--test-list "$test_list" --res-dir "$res_dir/pytorch")
  else
    choose_prompt
    io=(--prompt-wav "$prompt_wav" --prompt-text "$prompt_text" --text "$text"
      --res-wav-path "$res_dir/lora.wav")
  fi
  mkdir -p "$res_dir"
  "$python" -m zipvoice.bin.infer_zipvoice \
    --model-name "$model_name" \
    --model-dir "$model_dir" \
    --lora-path "$exp_dir/adapter" \
    --lora-scale "$lora_scale" \
    ${lora_t_range:+--lora-t-range "$lora_t_range"} \
    "${common[@]}" "${io[@]}" ${extra[@]+"${extra[@]}"}
fi

if run_stage 7; then
  log "Stage 7: ONNX export with the adapter merged, then onnxruntime synthesis"
  "$python" -m zipvoice.bin.onnx_export \
    --model-name "$model_name" \
    --model-dir "$model_dir" \
    --lora-path "$exp_dir/adapter" \
    --lora-scale "$lora_scale" \
    ${lora_t_range:+--lora-t-range "$lora_t_range"} \
    --onnx-model-dir "$onnx_dir" \
    --int8 "$onnx_int8" \
    --tokenizer japanese
  # shellcheck disable=SC2206
  extra=($infer_extra_args)
  if [ -n "$test_list" ]; then
    io=(--test-list "$test_list" --res-dir "$res_dir/onnx")
  else
    choose_prompt
    io=(--prompt-wav "$prompt_wav" --prompt-text "$prompt_text" --text "$text"
      --res-wav-path "$res_dir/lora_onnx.wav")
  fi
  mkdir -p "$res_dir"
  "$python" -m zipvoice.bin.infer_zipvoice_onnx \
    --onnx-model-dir "$onnx_dir" \
    --onnx-int8 "$onnx_int8" \
    --tokenizer japanese \
    --vocoder-path "$vocoder_path" \
    "${io[@]}" ${extra[@]+"${extra[@]}"}
fi

log "Done (stages $stage to $stop_stage)"
