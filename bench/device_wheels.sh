# Sourced by the device scripts (bench/device_setup.sh, device_kernels.sh, device_ab.sh,
# scripts/device_leg.sh): installs the carried wheels in $WHEELS (default .whl/) into /tmp/site
# and puts it on PYTHONPATH, when there are any: the pure ones and, of the compiled ones
# (pydantic_core, pyyaml per CPython version), this python3's. The device has no network.
whl_dir=${WHEELS:-.whl}
if compgen -G "$whl_dir/*.whl" > /dev/null; then
  whl_cp=cp$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls "$whl_dir"/*-none-any.whl "$whl_dir"/*-"$whl_cp"-"$whl_cp"-*.whl 2>/dev/null) \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
