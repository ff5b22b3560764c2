"""``lmforge env``: is this machine ready to train and serve, and if not, what to do about it.

The report holds the versions of Python and the packages lmforge uses (each one imported, since a
package that is installed but does not import -- a CUDA extension built for another torch -- is the
usual failure), the GPUs (memory, compute capability, driver), known-bad combinations, and the
free disk where outputs and caches go. Each problem is a :class:`Finding` with a level and the
fix. ``error`` means something lmforge needs is broken, and the command exits 1.

Version ranges come from the installed distributions' own metadata (lmforge's requirements, and
the requirements of the packages in :data:`STACK` on each other, such as torch's pin on triton),
read with ``importlib.metadata`` and compared with ``packaging``: nothing here hard-codes which
versions are compatible, so the check stays true as the libraries move.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# distribution -> (import name, what lmforge uses it for); the optional packages lmforge knows about
OPTIONAL: dict[str, tuple[str, str]] = {
    "flash-attn": ("flash_attn", "FlashAttention-2 kernels (--attn_impl flash_attention_2)"),
    "liger-kernel": ("liger_kernel", "Liger Triton kernels (--use_liger_kernel)"),
    "triton": ("triton", "GPU kernels of the native engine and the training fast path"),
    "bitsandbytes": ("bitsandbytes", "QLoRA and 8-bit optimizers (--train_type qlora, export bnb)"),
    "deepspeed": ("deepspeed", "ZeRO sharding (--deepspeed)"),
    "vllm": ("vllm", "the vllm inference backend (--infer_backend vllm)"),
    "trl": ("trl", "not needed by lmforge; its version is reported for comparison"),
    "gradio": ("gradio", "the browser pages (lmforge app, web-ui)"),
    "gguf": ("gguf", "GGUF export (export --quant_method gguf)"),
    "torchao": ("torchao", "int8/int4 export (export --quant_method int8|int4)"),
    "sentence-transformers": ("sentence_transformers", "embedding models for lmforge rag"),
    "pypdf": ("pypdf", "PDF documents in lmforge rag index"),
    "pillow": ("PIL", "images in vision-language rows"),
    "modelscope": ("modelscope", "--hub modelscope"),
    "openai": ("openai", "the OpenAI client (tests, examples)"),
    "wandb": ("wandb", "--report_to wandb"),
    "swanlab": ("swanlab", "--report_to swanlab"),
    "lm-eval": ("lm_eval", "lm-evaluation-harness tasks in lmforge eval"),
    "evalscope": ("evalscope", "EvalScope tasks in lmforge eval"),
}
# packages whose requirements on each other are checked (a pip-check limited to the training stack)
STACK = ("torch", "triton", "transformers", "tokenizers", "huggingface-hub", "safetensors", "peft", "accelerate",
         "datasets", "flash-attn", "liger-kernel", "bitsandbytes", "deepspeed", "vllm", "trl", "torchao",
         "sentence-transformers", "gradio")
_IMPORT_NAMES = {"pyyaml": "yaml", "huggingface-hub": "huggingface_hub", "jinja2": "jinja2", "pillow": "PIL"}
_REINSTALL = {"flash-attn": "pip install --force-reinstall --no-build-isolation --no-cache-dir flash-attn "
                            "(it must be built against the installed torch)"}
GiB = 1024 ** 3


@dataclasses.dataclass
class Finding:
    """One problem: ``level`` error (lmforge cannot work), warn (a feature or speed is lost) or info."""

    level: str
    what: str
    fix: str = ""


@dataclasses.dataclass
class Package:
    name: str
    required: bool
    version: str | None = None  # None: not installed
    imports: bool | None = None  # None: not tried (not installed)
    error: str | None = None
    use: str = ""
    spec: str = ""  # lmforge's requirement, e.g. "transformers<6,>=5.0"


# ------------------------------------------------------------------------------------------ packages

def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _lmforge_requirements() -> tuple[dict[str, Any], dict[str, Any]]:
    """(required, optional) requirements of the installed lmforge, by normalised name."""
    from packaging.requirements import Requirement

    required: dict[str, Any] = {}
    optional: dict[str, Any] = {}
    try:
        lines = md.requires("lmforge") or []
    except md.PackageNotFoundError:  # running from a source tree that is not installed
        lines = []
    for line in lines:
        req = Requirement(line)
        name = _norm(req.name)
        if req.marker is not None and "extra" in str(req.marker):
            optional.setdefault(name, req)
        else:
            required[name] = req
    return required, optional


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def import_status(module: str) -> tuple[bool, str | None]:
    """Whether ``module`` imports here, and the first line of the error if not."""
    try:
        importlib.import_module(module)
        return True, None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - an extension may raise anything (OSError, RuntimeError, SystemExit)
        text = str(e).strip().splitlines()
        return False, f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def collect_packages() -> list[Package]:
    required, optional = _lmforge_requirements()
    out: list[Package] = []
    for name, req in required.items():
        out.append(Package(name, True, spec=str(req).split(";")[0], use="required"))
    for name, (module, use) in OPTIONAL.items():
        req = optional.get(name)
        out.append(Package(name, False, spec=str(req).split(";")[0] if req else "", use=use))
    for pkg in out:
        pkg.version = _version(pkg.name)
        if pkg.version is None:
            continue
        module = OPTIONAL.get(pkg.name, (None,))[0] or _IMPORT_NAMES.get(pkg.name, pkg.name.replace("-", "_"))
        pkg.imports, pkg.error = import_status(module)
    return out


def package_findings(packages: list[Package]) -> list[Finding]:
    from packaging.requirements import Requirement

    found = []
    for p in packages:
        spec = Requirement(p.spec) if p.spec else None
        if p.required and p.version is None:
            found.append(Finding("error", f"{p.name} is not installed (lmforge needs {p.spec})",
                                 f"pip install '{p.spec}'"))
        elif p.version is not None and spec is not None and not spec.specifier.contains(p.version, prereleases=True):
            found.append(Finding("error" if p.required else "warn",
                                 f"{p.name} {p.version} is outside lmforge's range {p.spec}", f"pip install '{p.spec}'"))
        if p.version is not None and p.imports is False:
            fix = _REINSTALL.get(p.name, f"pip install --force-reinstall --no-cache-dir '{p.spec or p.name}'")
            what = f"{p.name} {p.version} is installed but does not import ({p.error})"
            found.append(Finding("error" if p.required else "warn",
                                 what + ("" if p.required else f"; unavailable: {p.use}"), fix))
    return found


def stack_findings(installed: dict[str, str]) -> list[Finding]:
    """Requirements of the installed stack packages on each other that the installed versions break
    (torch's pin on triton, vllm's on torch, transformers' range of tokenizers, ...)."""
    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    for dist in STACK:
        if dist not in installed:
            continue
        for line in md.requires(dist) or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra, or another platform
            other = _norm(req.name)
            if other not in installed or not req.specifier:
                continue
            if not req.specifier.contains(installed[other], prereleases=True):
                found.append(Finding(
                    "error", f"{dist} {installed[dist]} needs {req.name}{req.specifier}, but {other} "
                             f"{installed[other]} is installed",
                    f"pip install '{req.name}{req.specifier}' (or a {dist} release made for {other} {installed[other]})"))
    return found


# ---------------------------------------------------------------------------------------------- GPUs

def _nvidia_smi() -> tuple[list[dict[str, str]], str | None, str | None]:
    """(GPUs as nvidia-smi lists them, driver version, highest CUDA version the driver supports)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], None, None
    fields = "index,name,memory.total,memory.free,compute_cap,driver_version"
    try:
        q = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                           text=True, timeout=20)
        head = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None, None
    gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(","))))
            for line in q.stdout.splitlines() if line.strip()] if q.returncode == 0 else []
    m = re.search(r"CUDA Version:\s*([\d.]+)", head or "")
    driver = gpus[0].get("driver_version") if gpus else None
    return gpus, driver, m.group(1) if m else None


def collect_torch() -> dict[str, Any]:
    info: dict[str, Any] = {"installed": False}
    try:
        import torch
    except Exception:  # noqa: BLE001 - reported by the package check
        return info
    info.update(installed=True, version=torch.__version__, cuda=torch.version.cuda, hip=torch.version.hip,
                cuda_available=torch.cuda.is_available(), gpus=[])
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        info["cudnn"] = None
    smi, driver, driver_cuda = _nvidia_smi()
    info.update(driver=driver, driver_cuda=driver_cuda, nvidia_smi_gpus=len(smi))
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpu = {"index": i, "name": p.name, "memory_gib": round(p.total_memory / GiB, 1),
                   "compute_capability": f"{p.major}.{p.minor}"}
            try:
                free, _ = torch.cuda.mem_get_info(i)
                gpu["free_gib"] = round(free / GiB, 1)
            except Exception:  # noqa: BLE001 - a GPU in use by another process's exclusive mode
                pass
            info["gpus"].append(gpu)
        info["bf16"] = bool(torch.cuda.is_bf16_supported())
    elif smi:  # the driver sees GPUs that this torch cannot use
        info["gpus"] = [{"index": int(g.get("index", 0)), "name": g.get("name"),
                         "memory_gib": round(float(g.get("memory.total", 0)) / 1024, 1),
                         "compute_capability": g.get("compute_cap"), "usable": False} for g in smi]
    return info


def _as_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version or "")[:2])


def gpu_findings(t: dict[str, Any], installed: dict[str, str]) -> list[Finding]:
    found: list[Finding] = []
    if not t.get("installed"):
        return found
    cuda_build, available = t.get("cuda"), t.get("cuda_available")
    if cuda_build and not available:
        if t.get("nvidia_smi_gpus"):
            if t.get("driver_cuda") and _as_tuple(t["driver_cuda"]) < _as_tuple(cuda_build):
                found.append(Finding("error", f"torch {t['version']} is built for CUDA {cuda_build} but the driver "
                                              f"({t.get('driver')}) supports CUDA {t['driver_cuda']} at most",
                                     "update the NVIDIA driver, or install a torch build for CUDA "
                                     f"{t['driver_cuda']} or older"))
            else:
                found.append(Finding("error", f"nvidia-smi lists {t['nvidia_smi_gpus']} GPU(s) but torch {t['version']} "
                                              "cannot use them", "check CUDA_VISIBLE_DEVICES and that the driver "
                                                                 "loads (nvidia-smi without errors)"))
        else:
            found.append(Finding("warn", f"torch {t['version']} is a CUDA {cuda_build} build but no GPU is visible: "
                                         "everything runs on the CPU",
                                 "on a GPU machine, check the driver and CUDA_VISIBLE_DEVICES; on a CPU-only machine "
                                 "the CPU wheel is much smaller (pip install torch --index-url <PyTorch's CPU index>)"))
    if not cuda_build and not t.get("hip") and t.get("nvidia_smi_gpus"):
        found.append(Finding("error", f"torch {t['version']} is a CPU build but this machine has "
                                      f"{t['nvidia_smi_gpus']} NVIDIA GPU(s)",
                             "install a CUDA build of torch that the driver supports "
                             f"(CUDA {t.get('driver_cuda') or '?'} or older)"))
    for g in t.get("gpus", []):
        cc = _as_tuple(str(g.get("compute_capability")))
        if available and cc and cc < (8, 0):
            found.append(Finding("warn", f"GPU {g['index']} ({g['name']}) has compute capability "
                                         f"{g['compute_capability']}: no bfloat16, no FlashAttention-2",
                                 "train with --torch_dtype float16 and --attn_impl sdpa"))
    if not available:
        for dist, feature in (("bitsandbytes", "--train_type qlora"), ("flash-attn", "--attn_impl flash_attention_2"),
                              ("liger-kernel", "--use_liger_kernel"), ("vllm", "--infer_backend vllm")):
            if dist in installed:
                found.append(Finding("info", f"{dist} is installed but there is no usable GPU: {feature} will not run"))
    return found


# ----------------------------------------------------------------------------------- disk and folders

def cache_folders(output_dir: str) -> dict[str, Path]:
    from lmforge.dataset.encode import cache_root

    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return {"output": Path(output_dir), "lmforge cache": cache_root(),
            "hub cache": Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub")}


def free_bytes(path: Path) -> int:
    """Free space of the file system ``path`` is (or would be created) on."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_findings(disk: dict[str, dict], min_free_gb: float) -> list[Finding]:
    found = []
    for what, d in disk.items():
        free = d["free_gib"]
        if free < 1:
            found.append(Finding("error", f"{what} ({d['path']}): only {free:.2f} GiB free; checkpoints and caches "
                                          "will not fit", "free disk space there, or point it elsewhere "
                                                          f"({_MOVE_HINT[what]})"))
        elif free < min_free_gb:
            found.append(Finding("warn", f"{what} ({d['path']}): {free:.1f} GiB free (a 7B checkpoint with optimizer "
                                         "state needs about 45 GiB)", f"free disk space, or {_MOVE_HINT[what]}"))
    return found


_MOVE_HINT = {"output": "--output_dir", "lmforge cache": "LMFORGE_CACHE=<folder>", "hub cache": "HF_HOME=<folder>"}


def model_findings(model: str | None, installed: dict[str, str]) -> list[Finding]:
    """A transformers 5 tokenizer folder read by transformers 4 fails with 'TokenizersBackend does not exist'."""
    if not model:
        return []
    folder = Path(model).expanduser()
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return [Finding("warn", f"--model {model}: no tokenizer_config.json in that folder", "pass a model folder")]
    try:
        tok_class = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError) as e:
        return [Finding("error", f"{cfg}: cannot be read ({e})", "re-save the tokenizer")]
    if tok_class == "TokenizersBackend":
        major = _as_tuple(installed.get("transformers"))[:1]
        if major and major < (5,):
            return [Finding("error", f"{folder} has a transformers 5 tokenizer (TokenizersBackend); the installed "
                                     f"transformers {installed['transformers']} cannot load it",
                            "pip install 'transformers>=5', or re-export the model with `lmforge export --ckpt_dir "
                            f"{folder}` from a transformers 5 environment (it writes a config both versions read)")]
        return [Finding("info", f"{folder}: its tokenizer_config.json is transformers 5's own (TokenizersBackend); "
                                "tools pinned to transformers 4 (some vLLM builds) cannot load it",
                        f"lmforge export --ckpt_dir {folder} writes a tokenizer config both versions read")]
    return []


# --------------------------------------------------------------------------------------------- report

def collect(output_dir: str = "output", model: str | None = None, min_free_gb: float = 5.0) -> dict[str, Any]:
    """The whole report as a JSON-safe dict (``findings`` and ``ok`` included)."""
    packages = collect_packages()
    installed = {_norm(d): v for d in STACK if (v := _version(d))}
    installed.update({p.name: p.version for p in packages if p.version})
    torch_info = collect_torch()
    disk = {what: {"path": str(p), "free_gib": round(free_bytes(p) / GiB, 2)}
            for what, p in cache_folders(output_dir).items()}
    findings: list[Finding] = []
    if sys.version_info < (3, 10):
        findings.append(Finding("error", f"Python {platform.python_version()} is too old", "use Python 3.10 or newer"))
    findings += package_findings(packages)
    findings += stack_findings(installed)
    findings += gpu_findings(torch_info, installed)
    findings += disk_findings(disk, min_free_gb)
    findings += model_findings(model, installed)
    from lmforge import __version__

    return {
        "lmforge": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "torch": torch_info,
        "packages": [dataclasses.asdict(p) for p in packages],
        "disk": disk,
        "findings": [dataclasses.asdict(f) for f in findings],
        "ok": not any(f.level == "error" for f in findings),
    }


def format_report(r: dict[str, Any]) -> str:
    t = r["torch"]
    lines = [f"lmforge {r['lmforge']}   Python {r['python']['version']} ({r['python']['executable']})",
             f"platform: {r['python']['platform']}", ""]
    if t.get("installed"):
        build = f"CUDA {t['cuda']}" if t.get("cuda") else f"ROCm {t['hip']}" if t.get("hip") else "CPU build"
        lines.append(f"torch {t['version']} ({build}); driver {t.get('driver') or '-'} "
                     f"(supports CUDA {t.get('driver_cuda') or '-'})")
        for g in t.get("gpus", []):
            free = f", {g['free_gib']} GiB free" if "free_gib" in g else ""
            usable = "" if g.get("usable", True) else "  (not usable by torch)"
            lines.append(f"  GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB{free}, compute capability "
                         f"{g['compute_capability']}{usable}")
        if not t.get("gpus"):
            lines.append("  no GPU: training and inference run on the CPU")
    lines += ["", f"{'package':<24}{'version':<16}{'imports':<9}used for"]
    for p in r["packages"]:
        state = "-" if p["imports"] is None else "yes" if p["imports"] else "NO"
        lines.append(f"{p['name']:<24}{p['version'] or 'not installed':<16}{state:<9}{p['use']}")
    lines += ["", "free disk:"]
    for what, d in r["disk"].items():
        lines.append(f"  {what:<14}{d['free_gib']:>9.1f} GiB   {d['path']}")
    lines.append("")
    if not r["findings"]:
        lines.append("no problems found")
    for f in r["findings"]:
        lines.append(f"{f['level'].upper():<6}{f['what']}")
        if f["fix"]:
            lines.append(f"      fix: {f['fix']}")
    lines.append("")
    lines.append("ready" if r["ok"] else "NOT READY: fix the errors above")
    return "\n".join(lines)


def env_main(args: Any) -> dict[str, Any]:
    """Print the report; ``exit_code`` 1 when something required is broken (the CLI exits with it)."""
    report = collect(args.output_dir, args.model, args.min_free_gb)
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    return {**report, "exit_code": 0 if report["ok"] else 1}
