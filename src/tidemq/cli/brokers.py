"""``tide brokers``: list brokers, drain one (scale-in), undrain it.

``tide brokers drain ID`` asks the coordinator to move every replica off broker ID
(``POST /v1/brokers/{id}/drain``) and, unless ``--no-wait``, polls until the broker
holds no replica, printing each change of its count, and fails at ``--timeout-s``
with the moves still in progress. The broker can then be stopped and removed.
"""

from __future__ import annotations

import time
from typing import Any

import click

from tidemq.cli.client_commands import data_dir_option, target_for
from tidemq.cli.control import ControlPlane
from tidemq.cli.processes import ProbeError
from tidemq.cli.render import brokers_table, reassignments_table

POLL_INTERVAL_S = 0.5


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def brokers() -> None:
    """List brokers; drain one before removing it (scale-in)."""


@brokers.command("list")
@data_dir_option
def brokers_list(data_dir: str | None) -> None:
    """Brokers, their load, and the partition moves in progress."""
    control = ControlPlane(target_for(data_dir))
    try:
        listed = control.brokers()
        moves = control.reassignments()
    except ProbeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(brokers_table(listed, []))
    click.echo("")
    click.echo(reassignments_table(moves))


@brokers.command("drain")
@click.argument("broker_id", type=click.IntRange(min=0))
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until empty.")
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    help="How long to wait for the broker to hold nothing.",
)
@data_dir_option
def brokers_drain(broker_id: int, wait: bool, timeout_s: float, data_dir: str | None) -> None:
    """Move every replica off broker BROKER_ID (it gets no new ones)."""
    control = ControlPlane(target_for(data_dir))
    try:
        broker = control.drain(broker_id)
        _say(f"broker {broker_id} draining: {_load(broker)}")
        if wait:
            _wait_empty(control, broker_id, timeout_s)
    except ProbeError as error:
        raise click.ClickException(str(error)) from error


@brokers.command("undrain")
@click.argument("broker_id", type=click.IntRange(min=0))
@data_dir_option
def brokers_undrain(broker_id: int, data_dir: str | None) -> None:
    """Stop draining broker BROKER_ID; the rebalancer gives it a fair share again."""
    try:
        broker = ControlPlane(target_for(data_dir)).undrain(broker_id)
    except ProbeError as error:
        raise click.ClickException(str(error)) from error
    _say(f"broker {broker_id} no longer draining: {_load(broker)}")


def _load(broker: dict[str, Any]) -> str:
    return f"{broker.get('partitions')} replicas, {broker.get('leaders')} leaders"


def _wait_empty(control: ControlPlane, broker_id: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: str | None = None
    while True:
        [broker] = [b for b in control.brokers() if b.get("id") == broker_id] or [{}]
        load = _load(broker)
        if load != last:
            _say(f"broker {broker_id}: {load}")
            last = load
        if broker.get("partitions") == 0:
            _say(f"broker {broker_id} holds nothing: it can be stopped")
            return
        if time.monotonic() >= deadline:
            moves = reassignments_table(control.reassignments())
            raise click.ClickException(
                f"broker {broker_id} still holds {load} after {timeout_s:g} s "
                f"(it stays draining; `tide brokers undrain {broker_id}` cancels)\n{moves}"
            )
        time.sleep(POLL_INTERVAL_S)
