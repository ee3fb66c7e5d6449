"""Client commands: ``tide topics``, ``tide produce``, ``tide consume``, ``tide groups``.

They find the cluster through ``--data-dir``, the TIDE_* environment, or ./data
(control.resolve_target). Produce and consume use the public client library
(``tidemq.Producer`` / ``tidemq.Consumer``), imported inside the commands so that the
rest of ``tide`` works without it; topics and groups use the coordinator's documented
JSON API (control.ControlPlane).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

import click

from tidemq.cli.control import ConfigError, ControlPlane, Target, resolve_target
from tidemq.cli.processes import ProbeError
from tidemq.cli.render import format_record, group_table, partitions_table, table
from tidemq.errors import TideError

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Local cluster directory (default: TIDE_* environment, else ./data).",
)


def target_for(data_dir: str | None) -> Target:
    try:
        return resolve_target(data_dir)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


def _control(data_dir: str | None) -> ControlPlane:
    return ControlPlane(target_for(data_dir))


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


@click.group()
def topics() -> None:
    """Create, list, describe and delete topics."""


@topics.command("create")
@click.argument("name")
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Partition count (coordinator default: 12).",
)
@click.option(
    "--replication-factor",
    type=click.IntRange(min=1),
    default=None,
    help="Replicas per partition (coordinator default: 2).",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every partition's leader serves it.",
)
@data_dir_option
def topics_create(
    name: str,
    partitions: int | None,
    replication_factor: int | None,
    wait: bool,
    data_dir: str | None,
) -> None:
    """Create topic NAME."""
    try:
        control = _control(data_dir)
        topic = control.create_topic(name, partitions, replication_factor)
        if wait:
            topic = control.wait_topic_ready(name)
    except ProbeError as error:
        raise _fail(error) from error
    click.echo(
        f"created topic {topic.get('name', name)}: {len(topic.get('partitions', []))} "
        f"partitions, replication factor {topic.get('replication_factor')}"
    )


@topics.command("list")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def topics_list(as_json: bool, data_dir: str | None) -> None:
    """List topics."""
    try:
        described = _control(data_dir).topics()
    except ProbeError as error:
        raise _fail(error) from error
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    rows = [
        [t.get("name"), len(t.get("partitions", [])), t.get("replication_factor")]
        for t in sorted(described, key=lambda t: str(t.get("name")))
    ]
    click.echo(table(["TOPIC", "PARTITIONS", "REPLICATION"], rows))


@topics.command("describe")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def topics_describe(name: str, as_json: bool, data_dir: str | None) -> None:
    """Partitions of topic NAME: leader, epoch, replicas, ISR."""
    try:
        topic = _control(data_dir).topic(name)
    except ProbeError as error:
        raise _fail(error) from error
    if as_json:
        click.echo(json.dumps(topic, indent=2))
    else:
        click.echo(partitions_table([topic]))


@topics.command("delete")
@click.argument("name")
@data_dir_option
def topics_delete(name: str, data_dir: str | None) -> None:
    """Delete topic NAME and its data."""
    try:
        _control(data_dir).delete_topic(name)
    except ProbeError as error:
        raise _fail(error) from error
    click.echo(f"deleted topic {name}")


@click.group()
def groups() -> None:
    """List, describe and delete consumer groups."""


@groups.command("list")
@data_dir_option
def groups_list(data_dir: str | None) -> None:
    """Names of the consumer groups."""
    try:
        for name in sorted(_control(data_dir).groups()):
            click.echo(name)
    except ProbeError as error:
        raise _fail(error) from error


@groups.command("describe")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def groups_describe(name: str, as_json: bool, data_dir: str | None) -> None:
    """Members, assignments, committed offsets and lag of group NAME."""
    try:
        group = _control(data_dir).group(name)
    except ProbeError as error:
        raise _fail(error) from error
    click.echo(json.dumps(group, indent=2) if as_json else group_table(group))


@groups.command("delete")
@click.argument("name")
@data_dir_option
def groups_delete(name: str, data_dir: str | None) -> None:
    """Forget group NAME's committed offsets (refused while it has members)."""
    try:
        _control(data_dir).delete_group(name)
    except ProbeError as error:
        raise _fail(error) from error
    click.echo(f"deleted group {name}")


def split_line(line: str, separator: str | None) -> tuple[str | None, str]:
    """``key<sep>value`` -> (key, value); without a separator in the line, no key."""
    if separator is None or separator not in line:
        return None, line
    key, value = line.split(separator, 1)
    return key, value


def _messages(
    key: str | None, values: tuple[str, ...], separator: str | None
) -> Iterator[tuple[str | None, str]]:
    if values:
        for value in values:
            yield key, value
        return
    for raw in sys.stdin:
        line = raw.rstrip("\n").rstrip("\r")
        line_key, value = split_line(line, separator)
        yield (line_key if line_key is not None else key), value


@click.command()
@click.argument("topic")
@click.argument("values", nargs=-1)
@click.option("--key", default=None, help="Key of every message (routes to one partition).")
@click.option(
    "--key-separator",
    default=None,
    help="Split each stdin line into key and value at the first SEPARATOR.",
)
@click.option("--acks", type=click.Choice(["all", "1", "0"]), default="all", show_default=True)
@data_dir_option
def produce(
    topic: str,
    values: tuple[str, ...],
    key: str | None,
    key_separator: str | None,
    acks: str,
    data_dir: str | None,
) -> None:
    """Send VALUES (or one message per stdin line) to TOPIC; prints partition and offset."""
    from tidemq import Producer

    target = target_for(data_dir)
    pending: deque[Any] = deque()
    count = 0
    try:
        with Producer(
            **target.client_kwargs(), acks=acks if acks == "all" else int(acks)
        ) as producer:
            for message_key, value in _messages(key, values, key_separator):
                pending.append(producer.send(topic, value, key=message_key))
                count += 1
                while len(pending) > 10_000:
                    _print_metadata(pending.popleft())
            producer.flush()
            while pending:
                _print_metadata(pending.popleft())
    except TideError as error:
        raise _fail(error) from error
    click.echo(f"sent {count} message(s) to {topic}", err=True)


def _print_metadata(future: Any) -> None:
    metadata = future.result()
    click.echo(f"{metadata.partition} {metadata.offset}")


@click.command()
@click.argument("topic")
@click.option(
    "--group",
    default=None,
    help="Consumer group (default: a new group of its own, nothing committed).",
)
@click.option(
    "--from-beginning",
    is_flag=True,
    help="Without a committed offset, start at the earliest message.",
)
@click.option(
    "--offset-reset",
    type=click.Choice(["earliest", "latest"]),
    default=None,
    help="Where to start without a committed offset (default: earliest with "
    "--group, as a queue; latest without, as a tail).",
)
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after this many messages.",
)
@click.option(
    "--timeout-s",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit when no message arrived for this long.",
)
@data_dir_option
def consume(
    topic: str,
    group: str | None,
    from_beginning: bool,
    offset_reset: str | None,
    max_messages: int | None,
    timeout_s: float | None,
    data_dir: str | None,
) -> None:
    """Print messages of TOPIC as `partition offset key value` lines."""
    from tidemq import Consumer

    target = target_for(data_dir)
    reset = offset_reset or ("earliest" if from_beginning or group else "latest")
    own_group = group is None
    group = group or f"tide-console-{uuid.uuid4().hex[:12]}"
    received = 0
    last_message_at = time.monotonic()
    try:
        with Consumer(
            topic,
            group=group,
            auto_offset_reset=reset,
            enable_auto_commit=False,
            **target.client_kwargs(),
        ) as consumer:
            while max_messages is None or received < max_messages:
                wanted = 500 if max_messages is None else min(500, max_messages - received)
                messages = consumer.poll(timeout=0.5, max_records=wanted)
                for message in messages:
                    click.echo(
                        format_record(message.partition, message.offset, message.key, message.value)
                    )
                received += len(messages)
                if messages:
                    last_message_at = time.monotonic()
                    if not own_group:
                        consumer.commit()
                elif timeout_s is not None and time.monotonic() - last_message_at >= timeout_s:
                    break
    except KeyboardInterrupt:
        pass
    except TideError as error:
        raise _fail(error) from error
    click.echo(f"received {received} message(s)", err=True)
