# Sourced by bench/gpu_session.sh and bench/gpu_launch_check.sh: installs the offline kit's
# wheels ($KIT/*.whl or $KIT/wheels/*.whl) into a fresh temporary folder (no network,
# nothing written to the system) and puts it and ipt's src/ on PYTHONPATH. Without a kit, it
# says so and uses the environment's own packages. Needs PY (the python to use).
SITE=$(mktemp -d /tmp/ipt-site.XXXXXX)
WHEELS=$(compgen -G "$KIT/*.whl"; compgen -G "$KIT/wheels/*.whl")
if [ -n "$WHEELS" ]; then
  # shellcheck disable=SC2086 - one path a line, no spaces in wheel names
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    $WHEELS || { echo "the kit's wheels ($KIT) did not install"; exit 3; }
  echo "installed $(echo "$WHEELS" | wc -l) wheels from $KIT into $SITE"
  export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $KIT: using this environment's packages"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
