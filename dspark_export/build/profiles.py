"""Hardware profiles: what one `dspark-export build --profile NAME` targets.

A profile is a small YAML file (shipped in `profiles/`, or a user's own path). Everything a build
decides per machine lives there, so two builds with the same profile are comparable. Validation
is strict: an unknown or mistyped field would otherwise be silently ignored and give an engine
that differs from what the file says, so every error names the file and the field.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dspark_runtime.backends import backend_names
from dspark_runtime.backends.tensorrt.flavours import RTX

BACKENDS = backend_names()
SPEC_VERIFY_MODES = ("native", "plugin")  # SpecVerify as its inlined function body, or a plugin
RTX_TARGETS = RTX.aot_targets  # what TensorRT-RTX compiles for ahead of time, with no GPU
PRECISIONS = ("fp32", "fp16", "bf16")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
# Offline ORT levels. "all" adds layout transforms (NCHWc) that ORT itself marks as specific to
# the machine that ran them; they run online at load time instead.
ORT_OFFLINE_LEVELS = ("disabled", "basic", "extended")
# Integrated (Jetson) GPUs: JetPack's TensorRT has no hardware-compatibility mode.
_JETSON_SM = {"sm53", "sm62", "sm72", "sm87", "sm101", "sm110"}
_SM_RE = re.compile(r"^sm(\d+)(\d)$")
_MAX_GAMMA = 32


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class TokenRange:
    """min <= opt <= max, as in a TensorRT optimization profile dimension."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class OnnxRuntimeSettings:
    graph_optimization_level: str
    intra_op_threads: int
    execution_providers: tuple[str, ...]
    # the target's RMSNorms and rotary embeddings as ORT contrib ops (ort_fusions.py)
    contrib_fusions: bool = False


@dataclass(frozen=True)
class TensorRTSettings:
    compute_capability: str  # the first of compute_capabilities
    prefill_tokens: TokenRange
    prefill_max_batch: int
    verify_tokens_opt: int
    builder_optimization_level: int
    timing_cache: bool | str
    hardware_compatibility: str
    version_compatible: bool
    workspace_mib: int
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX: every target of the plan
    spec_verify: str = "native"

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        """`sm90` -> (9, 0), `sm87` -> (8, 7), `sm120` -> (12, 0)."""
        m = _SM_RE.match(self.compute_capability)
        assert m, self.compute_capability  # validated on load
        return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: str
    precision: str
    max_batch: int
    max_context: int
    gamma_min: int
    gamma_max: int
    source: str
    draft_vocab: int = 0  # tokens the drafter scores (models/draft_vocab.py); 0: all of them
    onnxruntime: OnnxRuntimeSettings | None = None
    tensorrt: TensorRTSettings | None = None

    def check_gamma(self, gamma: int) -> None:
        """Refuse a drafter whose block size the profile was not sized for."""
        if not self.gamma_min <= gamma <= self.gamma_max:
            raise ProfileError(
                f"{self.source}: the drafter's gamma (block_size) is {gamma}, outside the "
                f"profile's gamma range {self.gamma_min}..{self.gamma_max}")

    def verify_tokens_max(self, gamma: int) -> int:
        """Largest verify batch in tokens: every row verifies its whole block plus the bonus."""
        return self.max_batch * (gamma + 1)

    def to_dict(self) -> dict[str, Any]:
        """The resolved profile, JSON-ready (recorded in the bundle manifest)."""
        out = asdict(self)
        for key in ("onnxruntime", "tensorrt"):
            if out[key] is None:
                del out[key]
        if "tensorrt" in out:
            out["tensorrt"]["compute_capabilities"] = list(self.tensorrt.compute_capabilities)
        if "onnxruntime" in out:
            out["onnxruntime"]["execution_providers"] = list(self.onnxruntime.execution_providers)
        return out


def profiles_dir() -> Path:
    """The folder of shipped profiles (the `dspark_export.profiles` package)."""
    return Path(str(resources.files("dspark_export.profiles")))


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (`h100`) or a user's YAML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (path.is_file() or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text):
        path = profiles_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ProfileError(f"unknown profile '{text}' (shipped: {', '.join(list_profiles())}; "
                               "or pass the path of a YAML file)")
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({exc})") from exc
    return parse_profile(data, source=str(path), default_name=path.stem)


def parse_profile(data: Any, source: str, default_name: str) -> Profile:
    """Validate a parsed YAML mapping; every error names `source` and the field."""
    f = _Fields(data, source, "")
    backend = f.choice("backend", BACKENDS)
    precision = f.choice("precision", PRECISIONS)
    max_batch = f.integer("max_batch", 1, 4096)
    max_context = f.integer("max_context", 16, 1 << 20)
    gamma = f.section("gamma")
    g_min = gamma.integer("min", 1, _MAX_GAMMA)
    g_max = gamma.integer("max", g_min, _MAX_GAMMA)
    gamma.done()
    profile = dict(
        name=f.string("name", default=default_name),
        description=f.string("description", default=""), backend=backend,
        precision=precision, max_batch=max_batch, max_context=max_context, gamma_min=g_min,
        gamma_max=g_max, source=source,
        draft_vocab=f.integer("draft_vocab", 0, 1 << 24, default=0))
    other = "tensorrt" if backend == "onnxruntime" else "onnxruntime"
    if other in f.data:
        raise ProfileError(f"{source}: field '{other}' does not apply to a {backend} profile")
    if backend == "onnxruntime":
        if precision == "bf16":
            raise ProfileError(f"{source}: field 'precision': bf16 is not supported with the "
                               "onnxruntime backend (its CPU kernels lack bf16); use fp32 or fp16")
        profile["onnxruntime"] = _onnxruntime(f.section("onnxruntime"))
    else:
        profile["tensorrt"] = _tensorrt(f.section("tensorrt"), max_batch, max_context, g_max,
                                        rtx=backend == "tensorrt-rtx", name=profile["name"])
        if "sm75" in profile["tensorrt"].compute_capabilities and precision != "fp16":
            raise ProfileError(f"{source}: field 'precision': TensorRT-RTX on sm75 (Turing) "
                               f"builds fp16 only (no bf16, no fp32 GEMM), got {precision}")
    f.done()
    return Profile(**profile)


def _onnxruntime(f: _Fields) -> OnnxRuntimeSettings:
    level = f.string("graph_optimization_level", default="extended")
    if level == "all":
        raise f.error("graph_optimization_level",
                      "'all' adds hardware-specific layout transforms that must not be saved "
                      "offline (they run when the bundle is loaded); use disabled|basic|extended")
    if level not in ORT_OFFLINE_LEVELS:
        raise f.error("graph_optimization_level",
                      f"must be one of {', '.join(ORT_OFFLINE_LEVELS)}, got {level!r}")
    threads = f.integer("intra_op_threads", 0, 1024, default=0)
    providers = f.get("execution_providers", list, default=["CPUExecutionProvider"])
    if not providers or not all(isinstance(p, str) and p.endswith("ExecutionProvider")
                                for p in providers):
        raise f.error("execution_providers", "must be a non-empty list of ONNX Runtime provider "
                      f"names such as CPUExecutionProvider, got {providers!r}")
    fusions = f.get("contrib_fusions", bool, default=False)
    if fusions and providers != ["CPUExecutionProvider"]:
        raise f.error("contrib_fusions", "the fused target is measured on the CPU provider "
                      f"only; set it with execution_providers [CPUExecutionProvider], got "
                      f"{providers!r}")
    f.done()
    return OnnxRuntimeSettings(level, threads, tuple(providers), fusions)


def _tensorrt(f: _Fields, max_batch: int, max_context: int, gamma_max: int, *, rtx: bool,
              name: str) -> TensorRTSettings:
    targets = _compute_capabilities(f, rtx, name)
    sm = targets[0]
    prefill = f.section("prefill_tokens")
    p_min = prefill.integer("min", 1, max_context)
    p_opt = prefill.integer("opt", 1, max_context)
    p_max = prefill.integer("max", 1, max_context)
    if not p_min <= p_opt <= p_max:
        raise prefill.error("opt", f"must lie in min..max ({p_min}..{p_max}), got {p_opt}")
    prefill.done()
    # Prefill logits are [rows, tokens, vocab]: the engine reserves memory for the largest
    # prefill call, so its rows are capped separately from the verify batch.
    prefill_batch = f.integer("prefill_max_batch", 1, max_batch)
    verify_opt = f.integer("verify_tokens_opt", 1, max_batch * (gamma_max + 1))
    level = f.integer("builder_optimization_level", 0, 5, default=3)
    cache = f.get("timing_cache", (bool, str), default=not rtx)
    if isinstance(cache, str) and not cache.strip():
        raise f.error("timing_cache", "must be true, false or a file path")
    hw = f.choice("hardware_compatibility", HARDWARE_COMPATIBILITY, default="none")
    if hw != "none" and sm in _JETSON_SM:
        raise f.error("hardware_compatibility", f"must be none for {sm}: JetPack's TensorRT has "
                      "no hardware-compatibility mode")
    if hw == "ampere_plus" and int(_SM_RE.match(sm).group(1)) < 8:
        raise f.error("hardware_compatibility", f"ampere_plus needs an Ampere or newer target "
                      f"(sm80+), got {sm}")
    version_compatible = f.get("version_compatible", bool, default=False)
    workspace = f.integer("workspace_mib", 16, 1 << 20, default=4096)
    spec_verify = f.choice("spec_verify", SPEC_VERIFY_MODES, default="native")
    if rtx:
        for key, value, default in (("hardware_compatibility", hw, "none"),
                                    ("version_compatible", version_compatible, False),
                                    ("timing_cache", cache, False),
                                    ("spec_verify", spec_verify, "native")):
            if value != default:
                raise f.error(key, f"must be {str(default).lower()} in a tensorrt-rtx profile: "
                              f"{_RTX_REFUSES[key]}")
    f.done()
    return TensorRTSettings(sm, TokenRange(p_min, p_opt, p_max), prefill_batch, verify_opt, level,
                            cache, hw, version_compatible, workspace, tuple(targets), spec_verify)


# Why a TensorRT-RTX profile refuses a setting that full TensorRT takes.
_RTX_REFUSES = {
    "hardware_compatibility": "its engines list their targets (compute_capability: [sm80, sm89])",
    "version_compatible": "TensorRT-RTX has no version-compatible engines",
    "timing_cache": "TensorRT-RTX ignores the timing cache (kernels compile at first run)",
    "spec_verify": "the RTX bindings have no tensorrt.plugin module, so SpecVerify builds as "
                   "native layers",
}


def _compute_capabilities(f: _Fields, rtx: bool, name: str) -> list[str]:
    """`compute_capability`: one sm name or, for TensorRT-RTX, a list of them (one plan)."""
    value = f.get("compute_capability", (str, list))
    targets = value if isinstance(value, list) else [value]
    if not targets or not all(isinstance(t, str) and _SM_RE.match(t) for t in targets):
        raise f.error("compute_capability", "must look like sm80, sm87, sm90 (or, for "
                      f"tensorrt-rtx, a list of them), got {value!r}")
    if len(set(targets)) != len(targets):
        raise f.error("compute_capability", f"lists a target twice: {value!r}")
    if not rtx:
        if len(targets) > 1:
            raise f.error("compute_capability", "full TensorRT builds for one GPU: give one "
                          "(several targets in one plan need backend tensorrt-rtx)")
        return targets
    foreign = [t for t in targets if t not in RTX_TARGETS]
    if foreign:
        fits = ("profile jetson-orin (JetPack's TensorRT)" if set(foreign) & _JETSON_SM
                else "profiles h100 and h200")
        raise f.error("compute_capability",
                      f"of profile '{name}': TensorRT-RTX builds {', '.join(RTX_TARGETS)}, not "
                      f"{', '.join(foreign)}; use backend tensorrt ({fits}), whose builder is "
                      "the full TensorRT: pip install 'dspark-export[tensorrt]' "
                      "--extra-index-url https://pypi.nvidia.com")
    return targets


class _Fields:
    """Typed access to one YAML mapping that remembers which keys were read."""

    def __init__(self, data: Any, source: str, prefix: str):
        where = f"field '{prefix[:-1]}'" if prefix else "the profile"
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
        self.data, self.source, self.prefix, self.seen = data, source, prefix, set()

    def error(self, key: str, message: str) -> ProfileError:
        return ProfileError(f"{self.source}: field '{self.prefix}{key}' {message}")

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        types = types if isinstance(types, tuple) else (types,)
        # bool is an int subclass: `max_batch: true` must not pass as 1.
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("boolean" if t is bool else t.__name__ for t in types)
            raise self.error(key, f"must be {names}, got {value!r}")
        return value

    def string(self, key: str, default: Any = ...) -> str:
        return self.get(key, str, default)

    def integer(self, key: str, lo: int, hi: int, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if not lo <= value <= hi:
            raise self.error(key, f"must be in {lo}..{hi}, got {value}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise self.error(key, f"must be one of {', '.join(options)}, got {value!r}")
        return value

    def section(self, key: str) -> _Fields:
        self.seen.add(key)
        if key not in self.data:
            raise self.error(key, "is required")
        return _Fields(self.data[key], self.source, f"{self.prefix}{key}.")

    def done(self) -> None:
        """Reject keys nobody read: a typo must not silently fall back to a default."""
        unknown = sorted(set(map(str, self.data)) - self.seen)
        if unknown:
            allowed = ", ".join(sorted(self.seen))
            raise self.error(unknown[0], f"is unknown (allowed here: {allowed})")
