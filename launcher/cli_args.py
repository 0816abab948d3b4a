"""Arguments several commands share."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run spec YAML file, e.g. configs/demo.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides applied on top of the file, e.g. trainer.zero_stage=3 cluster.workers=2",
    )
