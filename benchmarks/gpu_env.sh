#!/usr/bin/env bash
# On the lent GPU machine (no network): install carried wheels from .whl/ for whatever is missing,
# into /tmp/site, and put the repo and /tmp/site on PYTHONPATH. Source it: `. benchmarks/gpu_env.sh`.
need=()
for mod_whl in bitsandbytes:bitsandbytes datasets:datasets dill:dill xxhash:xxhash multiprocess:multiprocess \
               fsspec:fsspec pyarrow:pyarrow pydantic:pydantic pydantic_core:pydantic_core \
               annotated_types:annotated_types typing_inspection:typing_inspection fastapi:fastapi \
               starlette:starlette uvicorn:uvicorn h11:h11 annotated_doc:annotated_doc \
               opentelemetry:opentelemetry_api importlib_metadata:importlib_metadata zipp:zipp click:click \
               anyio:anyio sniffio:sniffio httpx:httpx httpcore:httpcore certifi:certifi idna:idna \
               httpx2:httpx2 httpcore2:httpcore2 truststore:truststore distro:distro jiter:jiter openai:openai \
               liger_kernel:liger_kernel torchao:torchao kernels:kernels kernels_data:kernels_data tomlkit:tomlkit \
               gguf:gguf uvloop:uvloop httptools:httptools orjson:orjson; do
  mod=${mod_whl%%:*}; whl=${mod_whl##*:}
  if ! python3 -c "import $mod" 2>/dev/null; then
    f=$(ls .whl/${whl}-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] && need+=("$f") || echo "gpu_env: $mod missing and not carried"
  fi
done
if [ ${#need[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${need[@]}"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export LMFORGE_CACHE=/tmp/lmforge-cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib
for m in ("torch", "transformers", "peft", "accelerate", "datasets", "pyarrow", "bitsandbytes", "pydantic", "fastapi", "openai",
          "triton", "liger_kernel", "torchao", "kernels", "gguf", "uvloop", "httptools", "orjson"):
    try:
        mod = importlib.import_module(m); print(f"{m} {getattr(mod, '__version__', '?')}", end="; ")
    except Exception as e:  # noqa: BLE001
        print(f"{m} MISSING ({type(e).__name__})", end="; ")
print()
PY
