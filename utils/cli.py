"""Command-line glue shared by the scripts: --config / --set / --gpu, and the device they name."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from utils.config import Config, ConfigError
from utils.config_load import load_config
from utils.logger import log


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add --config, --set (collected into args.overrides) and --gpu to parser."""
    parser.add_argument("--config", default="args.yaml", metavar="PATH",
                        help="YAML config: an overlay on the defaults, e.g. configs/darknet.yaml (default: args.yaml)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values, e.g. --set data.img_size=320 model.arch=yolov3-tiny")
    parser.add_argument("--gpu", type=int, default=None, metavar="N",
                        help="CUDA device index; -1 forces CPU (default: cuda:0 if available, else CPU)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the Config named by parsed --config/--set arguments."""
    return load_config(args.config, args.overrides)


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
              ) -> tuple[argparse.Namespace, Config, torch.device]:
    """For scripts: parse argv, load the config and pick the device; a bad config or --gpu exits with one line."""
    args = parser.parse_args(argv)
    return (args, *cli_config(args))


def cli_config(args: argparse.Namespace) -> tuple[Config, torch.device]:
    """The config and device of parsed arguments; a bad config or --gpu exits with one line."""
    try:
        return config_from_args(args), select_device(args.gpu)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from e


def device_to_gpu(device: str) -> int:
    """A --device value (cpu, cuda, cuda:N or N) -> the --gpu index select_device takes (-1 for the CPU)."""
    text = device.strip().lower()
    if text == "cpu":
        return -1
    index = text.removeprefix("cuda").removeprefix(":") or "0"
    if not index.isdigit():
        raise ConfigError(f"--device {device!r}: expected cpu, cuda, cuda:N or N (a CUDA device index)")
    return int(index)


def select_device(gpu: int | None) -> torch.device:
    """Return the device for --gpu: None picks cuda:0 if available else CPU, -1 forces CPU."""
    if gpu is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if gpu == -1:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if not 0 <= gpu < count:
        valid = f"use 0..{count - 1}, or -1 for CPU" if count else "use -1 or leave --gpu out for CPU"
        raise ConfigError(f"--gpu {gpu}: no such CUDA device; this machine has {count} CUDA device(s); {valid}")
    return torch.device(f"cuda:{gpu}")


def training_device(cpu: bool, gpu: int | None, local_rank: int, distributed: bool) -> torch.device:
    """main.py's device: the CPU when asked (--device cpu), else CUDA (the local rank's GPU under torchrun, --gpu N
    otherwise); the CPU with a warning when there is no CUDA."""
    if cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if gpu not in (None, -1):
            log.warning("--gpu %s: no CUDA device on this machine; training on the CPU", gpu)
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}") if distributed else select_device(gpu)
