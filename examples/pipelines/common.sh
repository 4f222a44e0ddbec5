# Shared by the pipeline scripts: run one stage of the CLI with its own output folder.
# Usage in a script: stage NAME CONFIG [overrides...]; extra arguments given to the script (for example
# --trainer.max_steps=2 for a smoke run) are appended to every stage. Each run needs a folder of its own: run a
# pipeline again with OUT=runs/pipelines/<new name> (a stage refuses to start over an earlier run's checkpoint).
set -euo pipefail
CONFIGS="$(cd "$(dirname "${BASH_SOURCE[0]}")/../configs" && pwd)"
OUT="${OUT:-runs/pipelines/$(basename "$0" .sh)}"
LIGHTNING_ALIGN="${LIGHTNING_ALIGN:-lightning-align}"

stage() {
  local name="$1" config="$2"
  shift 2
  echo "== ${name}: ${config}"
  $LIGHTNING_ALIGN fit --config "${CONFIGS}/${config}.yaml" \
    --trainer.default_root_dir="${OUT}/${name}" --trainer.logger.init_args.save_dir="${OUT}/${name}" \
    --trainer.logger.init_args.name="${name}" "$@" ${EXTRA_ARGS}
}
EXTRA_ARGS="$*"
