#!/usr/bin/env bash
# A shell for make that times each recipe line: `make -s train SHELL=bench/stage_shell.sh`
# appends "<seconds> s  <command>" per line to $STAGE_LOG (default: stage_times.log).
start=$(date +%s.%N)
/bin/bash "$@"
rc=$?
end=$(date +%s.%N)
printf '%7.1f s  %s\n' "$(echo "$end - $start" | bc)" \
    "$(echo "${@: -1}" | head -c 160 | tr '\n' ' ')" >> "${STAGE_LOG:-stage_times.log}"
exit $rc
