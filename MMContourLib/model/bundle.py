"""A model bundle on disk: ``config.json`` + ``weights.safetensors`` (trainable weights only).

The frozen LLM is never copied into a bundle: the config names it (``text_encoder.source``) and
records its fingerprint, and loading with a different LLM is refused. Bundles are written
atomically (a new folder is renamed into place), so a crash never leaves a half-written bundle.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from .network import NetworkConfig, TextConditionedUNet
from ..note.clinical import PROMPT_TEMPLATE_VERSION, PROMPT_TEMPLATES
from ..image.fileio import WriteError, current_umask, explain_write_error, remove_stale_temps, temp_path
from ..image.preprocess import PreprocessConfig
from .text import TextEncoder, TextEncoderSpec, build_text_encoder

BUNDLE_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
SUPPORTED_TEMPLATES = tuple(PROMPT_TEMPLATES)


class BundleError(ValueError):
    """A bundle that cannot be used: missing, truncated, tampered with or from another version."""


@dataclass
class InferenceConfig:
    roi_size: tuple[int, int, int] = (384, 384, 128)
    overlap: float = 0.5
    threshold: float = 0.5
    # review thresholds calibrated on this model (``inference.review.ReviewConfig.for_bundle``; written by
    # ``bench/review_flags.py --calibrate K --save``) and how they were calibrated; empty: the defaults
    review: dict = field(default_factory=dict)
    # {structure: w}: the structure's voxels weighed w times the background around them in the training loss
    # (``mmcontour train --region-weight``), so the network over-draws it where it is unsure; the contourer
    # divides its probability by w before thresholding (``inference.contourer.undo_loss_weights``). Written by
    # ``bench/loss_weight_correction.py --save``, chosen on validation cases; empty: none.
    loss_weight_correction: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"roi_size": list(self.roi_size), "overlap": self.overlap, "threshold": self.threshold,
                **({"review": dict(self.review)} if self.review else {}),
                **({"loss_weight_correction": dict(self.loss_weight_correction)} if self.loss_weight_correction else {})}

    @classmethod
    def from_dict(cls, data: dict) -> "InferenceConfig":
        return cls(tuple(int(v) for v in data.get("roi_size", (384, 384, 128))), float(data.get("overlap", 0.5)),
                   float(data.get("threshold", 0.5)), dict(data.get("review") or {}),
                   dict(data.get("loss_weight_correction") or {}))


@dataclass
class ModelBundle:
    network: NetworkConfig
    text_encoder: TextEncoderSpec
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    name: str = "mmcontour"
    version: str = "0"
    prompt_template_version: str = PROMPT_TEMPLATE_VERSION
    training: dict = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # "net.*" and "text.*"
    path: Path | None = None
    created: str = ""

    @property
    def bundle_id(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.weights):
            h.update(k.encode())
            h.update(self.weights[k].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- build / capture ----------------------------------------------------------------------
    @classmethod
    def from_models(cls, network: TextConditionedUNet, text: TextEncoder, **fields) -> "ModelBundle":
        weights = {f"net.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        weights.update({f"text.{k}": v.detach().cpu().contiguous() for k, v in text.trainable_state_dict().items()})
        fields.setdefault("prompt_template_version", text.template)  # the bundle is read as it was trained
        return cls(network=network.config, text_encoder=TextEncoderSpec.from_dict(text.spec.to_dict()),
                   weights=weights, **fields)

    def build(self, device="cpu", llm: str | None = None, dtype="auto", allow_download: bool = False,
              gradient_checkpointing: bool = False) -> tuple[TextConditionedUNet, TextEncoder]:
        """The network and text encoder with this bundle's weights; the LLM is found at ``llm`` (default:
        where the bundle says) and must have the recorded fingerprint."""
        text = build_text_encoder(TextEncoderSpec.from_dict(self.text_encoder.to_dict()), device=device, dtype=dtype,
                                  llm=llm, allow_download=allow_download, gradient_checkpointing=gradient_checkpointing,
                                  template=self.prompt_template_version)
        if self.network.text_dim not in (None, text.dim):
            raise BundleError(f"network expects text width {self.network.text_dim}, the text model gives {text.dim}")
        network = TextConditionedUNet(self.network)
        self.load_weights_into(network, text)
        network.to(device).eval()
        text.eval()
        return network, text

    def load_weights_into(self, network: TextConditionedUNet, text: TextEncoder) -> None:
        """This bundle's weights into an existing network (strict) and text encoder (its prompt vectors);
        ``build`` and fine-tuning (``mmcontour train --init``) both use it."""
        net_state = {k[4:]: v for k, v in self.weights.items() if k.startswith("net.")}
        text_state = {k[5:]: v for k, v in self.weights.items() if k.startswith("text.")}
        try:
            network.load_state_dict(net_state, strict=True)
            text.load_trainable_state_dict(text_state)
        except (RuntimeError, ValueError) as exc:
            raise BundleError(f"bundle weights do not fit its config ({self.path}): {exc}") from None

    # -- disk -------------------------------------------------------------------------------------
    def config_dict(self, weights_sha256: str = "", weights_bytes: int = 0) -> dict:
        return {
            "format": BUNDLE_FORMAT, "name": self.name, "version": self.version,
            "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "mmcontour_version": __version__, "bundle_id": self.bundle_id,
            "network": self.network.to_dict(), "text_encoder": self.text_encoder.to_dict(),
            "prompt_template_version": self.prompt_template_version,
            "preprocessing": self.preprocessing.to_dict(), "inference": self.inference.to_dict(),
            "training": self.training,
            "files": {WEIGHTS_NAME: {"sha256": weights_sha256, "bytes": weights_bytes}},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: the bundle appears complete or not at all, and an existing one is replaced
        only once the new one is fully written and read back. Files get the process's umask like any
        other (safetensors creates its file 0600)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path.parent, path.name)
            tmp = temp_path(path, directory=True)
        except OSError as exc:
            raise explain_write_error(exc, path) from None
        try:
            weights_file = tmp / WEIGHTS_NAME
            try:
                source = self._unchanged_weights_file()
                if source is not None:  # new settings, same weights: the same file, byte for byte
                    shutil.copyfile(source, weights_file)
                else:
                    save_file({k: v.contiguous() for k, v in self.weights.items()}, str(weights_file),
                              metadata={"format": "pt", "mmcontour": __version__})
                digest = _sha256(weights_file)
                config = self.config_dict(digest, weights_file.stat().st_size)
                (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
                mode = 0o666 & ~current_umask()
                for f in tmp.iterdir():
                    os.chmod(f, mode)
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                ModelBundle.load(tmp)  # sizes, checksum and config read back before anything is replaced
            except OSError as exc:
                raise explain_write_error(exc, path) from None
            except BundleError as exc:
                raise WriteError(errno.EIO, f"cannot write bundle {path}: it does not read back ({exc}); "
                                            "the disk may be full. Nothing was replaced") from None
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
            tmp.rename(path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.path = path
        return path

    def _unchanged_weights_file(self) -> Path | None:
        """The weights file this bundle was loaded from, if it still holds exactly ``self.weights`` (names,
        dtypes, values). A bundle saved again with new settings (review calibration) then keeps its weights
        file and checksum; writing the same tensors anew can give other bytes (safetensors' metadata)."""
        source = None if self.path is None else Path(self.path) / WEIGHTS_NAME
        if source is None or not source.is_file():
            return None
        try:
            old = load_file(str(source))
        except Exception:  # unreadable now: write the weights anew
            return None
        if old.keys() != self.weights.keys():
            return None
        same = all(old[k].dtype == v.dtype and old[k].shape == v.shape and torch.equal(old[k], v.detach().cpu())
                   for k, v in self.weights.items())
        return source if same else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelBundle":
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle folder not found: {path}")
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise BundleError(f"bundle {path} is incomplete: {f.name} is missing. Copy the whole bundle folder again.")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"bundle {path}: {CONFIG_NAME} is not valid JSON ({exc}); the file is damaged") from None
        missing = [k for k in ("format", "network", "text_encoder", "prompt_template_version", "files") if k not in config]
        if missing:
            raise BundleError(f"bundle {path}: {CONFIG_NAME} lacks {', '.join(missing)}")
        if config["format"] != BUNDLE_FORMAT:
            raise BundleError(f"bundle {path} has format {config['format']}; this MMContour reads format {BUNDLE_FORMAT}")
        if config["prompt_template_version"] not in SUPPORTED_TEMPLATES:
            raise BundleError(f"bundle {path} was trained with prompt template {config['prompt_template_version']!r}; "
                              f"this MMContour reads {', '.join(SUPPORTED_TEMPLATES)}")
        expected = config["files"].get(WEIGHTS_NAME, {})
        size = weights_file.stat().st_size
        if expected.get("bytes") and size != expected["bytes"]:
            raise BundleError(f"bundle {path}: {WEIGHTS_NAME} has {size} bytes, expected {expected['bytes']} "
                              "(truncated or partly copied). Copy the bundle again.")
        if expected.get("sha256") and _sha256(weights_file) != expected["sha256"]:
            raise BundleError(f"bundle {path}: {WEIGHTS_NAME} does not match its checksum (damaged or modified)")
        try:
            weights = load_file(str(weights_file))
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"bundle {path}: cannot read {WEIGHTS_NAME}: {exc}") from None
        net_cfg = dict(config["network"])
        try:
            network = NetworkConfig(**net_cfg)
            text = TextEncoderSpec.from_dict(config["text_encoder"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle {path}: invalid network/text_encoder config: {exc}") from None
        return cls(network=network, text_encoder=text,
                   preprocessing=PreprocessConfig.from_dict(config.get("preprocessing", {})),
                   inference=InferenceConfig.from_dict(config.get("inference", {})),
                   name=config.get("name", path.name), version=str(config.get("version", "0")),
                   prompt_template_version=config["prompt_template_version"], training=config.get("training", {}),
                   weights=weights, path=path, created=config.get("created", ""))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
