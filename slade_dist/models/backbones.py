"""Backbone registry: name -> a module that maps images (B, 3, H, W) to a feature map or tokens.

Owns the torchvision ResNet-50/18 trunks (weights only from a local file), `tiny_cnn` (for CPU
tests and the 64x64 demo), `timm:<name>` backbones (random, or the model's published weights from
the Hugging Face hub cache, `HubWeightsMissing` when not cached offline; transformers at any input
size, tokens pooled per model.token_pool), and reading weights: `read_checkpoint` (torch files with
weights_only=True, safetensors), `load_state_dict_checked` (names every key that does not fit) and
`load_pretrained_backbone`. Tests: tests/unit/test_models.py.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..errors import UserError


class StateDictMismatchError(RuntimeError, UserError):
    """A state dict does not fit a module; the message lists every offending key."""


class HubWeightsMissing(UserError):
    """model.pretrained=hub, but the weights are neither in the local hub cache nor reachable."""


# ------------------------------------------------------------------------------------ backbones
class Backbone(nn.Module):
    """Base: forward(x) -> feature map (B, C, H, W) or tokens (B, N, C); `feature_dim` = C."""

    feature_dim: int


class ResNetTrunk(Backbone):
    """A torchvision ResNet without avgpool/fc. Submodule names equal torchvision's, so a
    torchvision (or SwAV) ResNet state dict loads after dropping its `fc.*` keys."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        import torchvision

        ctor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        net = ctor(weights=None)  # never download: weights only from model.pretrained_path
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.feature_dim = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(Backbone):
    """Four conv blocks (3x3 conv + BN + ReLU, 2x2 max-pool after each; blocks 3-4 have two convs).

    Sized for 2 CPU cores: ~0.1 GMAC per 64x64 image, 16x downsampling (64x64 -> 4x4 map), enough
    receptive field (~70 px) and width to separate fine details of the procedural demo images.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 192)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += _conv_bn_relu(cin, w)
            if i >= 2:  # second conv only at low resolution, where it is cheap
                layers += _conv_bn_relu(w, w)
            layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.feature_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# model.token_pool -> timm's global_pool of a transformer
TOKEN_POOLS = {"cls": "token", "mean": "avg"}


class TimmBackbone(Backbone):
    """A timm model, classifier removed. CNNs: `forward_features` (B, C, H, W), pooled by the
    Embedder (model.pooling). Transformers: tokens pooled here as model.token_pool says (B, C)."""

    def __init__(self, name: str, hub: bool = False, token_pool: str = "auto") -> None:
        super().__init__()
        try:
            import timm  # optional dependency: imported only when a timm backbone is asked for
        except ImportError as e:
            raise ImportError(
                f"model.backbone='timm:{name}' needs the optional package timm "
                f"(pip install -c constraints.txt -e '.[timm]'); it is not installed"
            ) from e
        self.name = name
        self.net = _create_timm(timm, name, hub)
        self.tokens = hasattr(self.net, "num_prefix_tokens")  # ViT-like: forward_features gives (B, N, C)
        if self.tokens and token_pool != "auto":
            _set_token_pool(self.net, name, token_pool)
        dim = getattr(self.net, "head_hidden_size", None) if self.tokens else None
        self.feature_dim = int(dim or self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net.forward_features(x)
        # the family's own pooling (and its norm after pooling, where it has one); pre_logits: no head
        return self.net.forward_head(feats, pre_logits=True) if self.tokens else feats


def _create_timm(timm: Any, name: str, hub: bool) -> nn.Module:
    """timm.create_model without a classifier; a dynamic image size where the model has one (ViTs:
    position embeddings interpolated per input size, a side that is no multiple of the patch padded:
    SwAV's 96 px crops through a patch-14 ViT), and from the hub cache when `hub`."""
    try:
        try:
            return timm.create_model(name, pretrained=hub, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True)
        except TypeError:  # a model without that option (CNNs take any input size anyway)
            return timm.create_model(name, pretrained=hub, num_classes=0)
    except Exception as e:
        if hub and _is_hub_error(e):
            raise HubWeightsMissing(_hub_miss_message(timm, name, e)) from e
        if "Unknown model" in str(e):  # timm's RuntimeError for a name it does not register
            raise ConfigError(
                f"model.backbone: timm does not know the model {name!r}; list names with "
                f"python -c \"import timm; print(timm.list_models('{name.split('.')[0][:12]}*'))\""
            ) from e
        if hub and "No pretrained weights exist" in str(e):
            raise ConfigError(
                f"model.pretrained=hub: timm publishes no weights for {name!r}; name a tagged model "
                f"(python -c \"import timm; print(timm.list_pretrained('{name.split('.')[0]}*'))\") or use a local file"
            ) from e
        raise


def _is_hub_error(e: BaseException) -> bool:
    """An error of the hub client (not cached and offline, unreachable, unknown or gated repo)."""
    return any(c.__module__.startswith("huggingface_hub") for c in type(e).__mro__) or isinstance(e, ConnectionError)


def _hub_miss_message(timm: Any, name: str, error: BaseException) -> str:
    from huggingface_hub import constants  # timm's own dependency, there whenever timm loads from the hub

    cache = constants.HF_HUB_CACHE
    repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE=1 forbids fetching them"
    else:
        lines = str(error).strip().splitlines()
        why = f"fetching them failed ({type(error).__name__}: {lines[0] if lines else ''})"
    fill = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    return (
        f"model.pretrained=hub: the weights of timm model {name!r} (hub repo {repo}) are not in the "
        f"Hugging Face cache {cache}, and {why}. Fill the cache where huggingface.co is reachable: "
        f"HF_HUB_CACHE={cache} {fill} (then copy {cache} here), or set model.pretrained to a local weights file"
    )


def _set_token_pool(net: nn.Module, name: str, token_pool: str) -> None:
    """model.token_pool cls | mean on a transformer: its global pooling replaced (timm keeps the
    norm placement, so the pretrained weights still apply)."""
    if token_pool not in TOKEN_POOLS:
        raise ConfigError(f"model.token_pool: unknown {token_pool!r}; choose auto, cls or mean")
    if token_pool == "cls" and not getattr(net, "has_class_token", getattr(net, "cls_token", None) is not None):
        raise ConfigError(f"model.token_pool=cls, but timm model {name!r} has no class token: use mean or auto")
    try:
        net.reset_classifier(0, global_pool=TOKEN_POOLS[token_pool])
    except (AssertionError, TypeError, ValueError) as e:
        raise ConfigError(f"model.token_pool={token_pool}: timm model {name!r} cannot pool so ({e}); use auto") from e


# one constructor per name of config.BACKBONE_NAMES (tests/unit/test_models.py checks both agree)
BACKBONES: dict[str, Callable[[], Backbone]] = {
    "resnet50": lambda: ResNetTrunk(50),
    "resnet18": lambda: ResNetTrunk(18),
    "tiny_cnn": TinyCNN,
}


def build_backbone(name: str, hub: bool = False, token_pool: str = "auto") -> Backbone:
    """`resnet50 | resnet18 | tiny_cnn | timm:<name>` -> an untrained backbone (`hub`: a timm
    model's published weights; `token_pool`: a timm transformer's pooling)."""
    if name.startswith("timm:"):
        return TimmBackbone(name.split(":", 1)[1], hub=hub, token_pool=token_pool)
    if hub:
        raise ConfigError(f"model.pretrained=hub needs a timm:<name> backbone, not {name!r}")
    if name not in BACKBONES:
        raise ValueError(
            f"unknown model.backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))} or timm:<model name>"
        )
    return BACKBONES[name]()


# ---------------------------------------------------------------------------- state-dict loading
def _fmt_keys(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "state dict"
) -> None:
    """Load `state_dict` into `module`; any missing / unexpected / mis-shaped key raises
    StateDictMismatchError listing them all (nothing is loaded)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint shape {tuple(v.shape)} vs model shape {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"{what} does not match {type(module).__name__}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}")
        raise StateDictMismatchError("\n".join(parts))
    module.load_state_dict(state_dict)


class CheckpointError(RuntimeError, UserError):
    """A weights file that cannot be used: corrupt, not a torch / safetensors file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that needs code (a class or function import) to unpickle."""


def unsafe_global(e: pickle.UnpicklingError) -> str | None:
    """The line of torch's weights_only refusal naming the global (class or function) a file needs."""
    return next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the doc")]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header ('{'). A
    torch file starts with a zip ('PK') or pickle (0x80) signature, so the two never look alike."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32


def _read_safetensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file  # with timm (the [timm] extra)
    except ImportError as e:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file: reading it needs the package safetensors "
            f"(pip install -c constraints.txt -e '.[timm]')"
        ) from e
    device = map_location if isinstance(map_location, str) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is a corrupt safetensors file ({_last_line(e)})") from e


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True), or a safetensors file (data only by construction), with
    clear errors for a missing, unreadable or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if is_safetensors(path):
        return _read_safetensors(path, map_location)
    try:
        # weights_only: a checkpoint is data, never code. Our files hold only tensors and plain
        # containers; a file that needs any other class to unpickle is refused here.
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if unsafe := unsafe_global(e):  # a class or function to import: the file could run code when unpickled
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} refused: loading it would import code ({unsafe}); "
                f"only tensors and plain containers are accepted (weights_only=True). Re-save just "
                f"its state_dict with torch.save if you trust where it came from"
            ) from e
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a torch file ({_last_line(e)})") from e
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a torch file ({type(e).__name__}: {e})"
        ) from e


# Prefixes that wrappers put in front of backbone keys: DataParallel/DDP ("module."), SwAV/DINO
# style trainers ("backbone.", "encoder.", "model."), our own Embedder ("backbone.", "net." of timm).
KNOWN_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Heads that pretraining checkpoints carry and a backbone does not have.
HEAD_PREFIXES = ("fc.", "projection_head.", "prototypes.", "head.", "heads.", "classifier.")


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = KNOWN_PREFIXES) -> dict[str, Any]:
    """Remove wrapper prefixes repeatedly while EVERY key carries the same one."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    # SwAV saves "module.<trunk keys>" next to "module.projection_head..." -> after "module." the
    # trunk keys are bare; our Embedder saves "backbone.*" next to "head.*": strip per key too.
    out = {}
    for k, v in sd.items():
        out[k[len("backbone.") :] if k.startswith("backbone.") else k] = v
    return out


def _unwrap(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module", "teacher"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                if any(hasattr(v, "shape") for v in inner.values()):
                    return inner
        if obj and any(hasattr(v, "shape") for v in obj.values()):
            return obj
    raise CheckpointError(
        "checkpoint holds no state dict (looked at the top level and under 'state_dict', 'model', 'module', 'teacher')"
    )


def load_pretrained_backbone(backbone: Backbone, path: str | Path) -> None:
    """Load local pretrained weights (torchvision, SwAV `module.` style, timm, or our own
    embedder file) into a backbone; classifier/projection heads are dropped, anything else that
    does not fit raises with the exact keys."""
    sd = strip_prefixes(_unwrap(read_checkpoint(path)))
    target = backbone.net if isinstance(backbone, TimmBackbone) else backbone
    if isinstance(backbone, TimmBackbone):
        sd = {k[len("net.") :] if k.startswith("net.") else k: v for k, v in sd.items()}
    own = target.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    load_state_dict_checked(target, sd, what=f"pretrained weights {str(path)!r}")
