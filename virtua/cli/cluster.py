"""CLI commands of the cluster layer: host, template, vc, vm (they talk to `virtua serve`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from virtua.cli import render
from virtua.cli.main import State, app, call

if TYPE_CHECKING:
    from virtua.net.lab import Lab

host_app = typer.Typer(no_args_is_help=True, help="Physical hosts (each runs `virtua agent`)")
template_app = typer.Typer(no_args_is_help=True, help="VM templates: a read-only volume plus boot metadata")
vc_app = typer.Typer(no_args_is_help=True, help="Virtual clusters")
vm_app = typer.Typer(no_args_is_help=True, help="Single VMs of a virtual cluster (VC/NODE)")
app.add_typer(host_app, name="host")
app.add_typer(template_app, name="template")
app.add_typer(vc_app, name="vc")
app.add_typer(vm_app, name="vm")

HOST_COLUMNS = ["name", "address", "state", "alive", "cores", "cores_used", "memory_mb", "memory_used_mb", "accel", "vms"]


@host_app.command("list")
def host_list() -> None:
    """Registered hosts, their capacity and load."""
    call("host.list", HOST_COLUMNS)


@host_app.command("info")
def host_info(name: str) -> None:
    """A host's record, VMs and leftover network state (taps, routes, rules)."""
    call("host.info", name=name)


@host_app.command("add")
def host_add(
    name: str, address: str = typer.Option(..., "--address", help="agent HOST:PORT"),
    cores: int | None = typer.Option(None, "--cores"), memory: str | None = typer.Option(None, "--memory"),
) -> None:
    """Register a host by hand (its agent normally registers itself)."""
    call("host.add", name=name, address=address, cores=cores, memory=memory)


@host_app.command("remove")
def host_remove(name: str, force: bool = typer.Option(False, "--force")) -> None:
    """Forget a host and revoke its certificate (refused while it runs VMs, unless --force)."""
    call("host.remove", name=name, force=force)


@host_app.command("rm")
def host_rm(name: str, force: bool = typer.Option(False, "--force")) -> None:
    """Forget a host and revoke its certificate (same as `host remove`)."""
    call("host.remove", name=name, force=force)


@host_app.command("join-token")
def host_join_token(
    name: str | None = typer.Argument(None, help="the host it joins (needed for a host added with `host add`)"),
    ttl: str = typer.Option("1h", "--ttl", help="how long it stays valid, e.g. 30m, 1h, 2d"),
    output: str | None = typer.Option(None, "--output", "-o", help="write it to this file (0600) instead of stdout"),
) -> None:
    """A one-time token for a new host: `virtua agent --join-token-file FILE` on that host.
    With NAME it joins that host only."""
    r = State.client().call("host.join-token", ttl=ttl, name=name)
    if output is None:
        sys.stdout.write(r["token"] + "\n")
        return
    from virtua.pki.files import write_private

    write_private(Path(output), (r["token"] + "\n").encode())
    render.emit({"id": r["id"], "expires": r["expires"], "file": output}, State.json)


@host_app.command("drain")
def host_drain(name: str) -> None:
    """Place nothing more on a host and move its VMs away."""
    call("host.drain", name=name)


@host_app.command("undrain")
def host_undrain(name: str) -> None:
    """Let VMs be placed on a drained host again."""
    call("host.undrain", name=name)


@template_app.command("build")
def template_build(
    name: str, pool: str | None = typer.Option(None, "--pool"),
    size: str | None = typer.Option(None, "--size", help="root filesystem size (default 64M)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the job to its end (else print its ID)"),
) -> None:
    """Build a bootable Linux template from Debian packages (cloud kernel + busybox ext4 root).
    A recorded job (`virtua job list`): a failure or a crash in the middle undoes it."""
    client = State.client()
    began = client.call("template.build", **{k: v for k, v in dict(name=name, pool=pool, size=size).items()
                                             if v is not None}, wait=False)
    if not wait:
        render.emit(began, State.json)
        return
    from virtua.cli.follow import follow

    follow(client, began["job"], f"template build {name}", name_job=False)
    call("template.info", name=name)


@template_app.command("import")
def template_import(
    name: str, image: str = typer.Argument(..., help="raw or qcow2 root disk"),
    kernel: str | None = typer.Option(None, "--kernel"), initrd: str | None = typer.Option(None, "--initrd"),
    cmdline: str | None = typer.Option(None, "--cmdline"), pool: str | None = typer.Option(None, "--pool"),
) -> None:
    """Make a template of an existing root disk image (files under the daemon's --import-dir)."""
    import os

    def where(path: str | None) -> str | None:
        # a file here is named absolutely; any other relative path is the import directory's
        return os.path.abspath(path) if path and os.path.exists(path) else path

    call("template.import", name=name, image=where(image), kernel=where(kernel), initrd=where(initrd),
         cmdline=cmdline, pool=pool)


@template_app.command("list")
def template_list() -> None:
    call("template.list", ["name", "snapshot", "size", "allocated", "snapshots", "vcs"])


@template_app.command("info")
def template_info(name: str) -> None:
    call("template.info", name=name)


@template_app.command("rm")
def template_rm(name: str) -> None:
    call("template.rm", name=name)


@vc_app.command("create")
def vc_create(
    name: str,
    template: str = typer.Option(..., "--template", "-t"),
    nodes: int = typer.Option(..., "--nodes", "-n"),
    cpus: int = typer.Option(1, "--cpus"),
    memory: str = typer.Option("256M", "--memory"),
    disk: str | None = typer.Option(None, "--disk", help="node disk size (default: the template's)"),
    swap: str = typer.Option("64M", "--swap"),
    strategy: str = typer.Option("block", "--strategy", help="block or cyclic"),
    mode: str = typer.Option("strict", "--mode", help="strict (1 vCPU per core) or lazy"),
    subnet: str | None = typer.Option(None, "--subnet", help="private CIDR (default: allocated)"),
    start: bool = typer.Option(False, "--start", help="boot the nodes right away"),
    egress: str = typer.Option(
        "none", "--egress",
        help="what guests reach beyond their VC (never the hosts): none, nat (behind their host's address) or routed",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="check and print the plan and placement; change nothing"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the job to its end (else print its ID)"),
) -> None:
    """Create a virtual cluster: one clone of the template per node, swap, per-node seeds.
    A recorded job (`virtua job list`): a failure or a crash in the middle undoes it."""
    t0 = time.monotonic()
    if dry_run:
        result = State.client().call("vc.create", name=name, template=template, nodes=nodes, cpus=cpus,
                                     memory=memory, swap=swap, strategy=strategy, mode=mode,
                                     egress=egress, dry_run=True, **({"subnet": subnet} if subnet else {}),
                                     **({"disk": disk} if disk else {}))
        render.emit(result, State.json)
        return
    args = {k: v for k, v in dict(name=name, template=template, nodes=nodes, cpus=cpus, memory=memory, disk=disk,
                                  swap=swap, strategy=strategy, mode=mode, subnet=subnet, start=start,
                                  egress=egress).items() if v is not None}
    client = State.client()
    began = client.call("vc.create", **args, wait=False)
    if not wait:
        render.emit(began, State.json)
        return
    from virtua.cli.follow import follow

    follow(client, began["job"], f"vc create {name}")
    vc_call("vc.info", name=name)
    if not State.json:
        render.err.print(f"done in {time.monotonic() - t0:.1f} s")


NODE_COLUMNS = ["name", "host", "state", "address", "accel", "disk_unique", "disk_shared"]


def _show_vc(result: dict) -> None:  # type: ignore[type-arg]
    if State.json:
        return
    render.emit(result["nodes"], False, NODE_COLUMNS)


def vc_call(op: str, **args: object) -> None:
    result = State.client().call(op, **{k: v for k, v in args.items() if v is not None})
    if State.json:
        render.emit(result, True)
        return
    if isinstance(result, dict) and "nodes" in result:
        summary = {k: result[k] for k in ("name", "template", "state", "subnet", "egress", "strategy", "mode", "cpus",
                                          "memory_mb", "disk_unique_total", "template_allocated",
                                          "full_copies_would_use")}
        render.emit(summary, False)
        _show_vc(result)
    else:
        render.emit(result, False)


WAIT_HELP = "follow the job to its end (else print its ID)"


def _vc_job(op: str, name: str, wait: bool, **args: Any) -> None:
    """Start a VC-wide job (a recorded job: `virtua job list`) and follow it to its end."""
    client = State.client()
    began = client.call(f"vc.{op}", name=name, wait=False, **args)
    if not wait:
        render.emit(began, State.json)
        return
    from virtua.cli.follow import follow

    follow(client, began["job"], f"vc {op} {name}", name_job=False)
    vc_call("vc.info", name=name)


@vc_app.command("start")
def vc_start(name: str, wait: bool = typer.Option(True, "--wait/--no-wait", help=WAIT_HELP)) -> None:
    """Boot every node (waits until each is up). A recorded job (`virtua job list`)."""
    _vc_job("start", name, wait)


@vc_app.command("stop")
def vc_stop(
    name: str,
    force: bool = typer.Option(False, "--force", help="kill instead of powering off"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help=WAIT_HELP),
) -> None:
    """Power off every node, wherever it runs. A recorded job."""
    _vc_job("stop", name, wait, force=force)


@vc_app.command("suspend")
def vc_suspend(name: str, wait: bool = typer.Option(True, "--wait/--no-wait", help=WAIT_HELP)) -> None:
    """Save every node's memory state and stop it; resume continues where it stopped. A recorded job."""
    _vc_job("suspend", name, wait)


@vc_app.command("resume")
def vc_resume(name: str, wait: bool = typer.Option(True, "--wait/--no-wait", help=WAIT_HELP)) -> None:
    """Resume a suspended VC (on the hosts its mapping names now). A recorded job."""
    _vc_job("resume", name, wait)


for _op in ("reset", "info"):
    def _make(op: str) -> None:
        def cmd(name: str) -> None:
            vc_call(f"vc.{op}", name=name)

        cmd.__doc__ = {
            "reset": "Every node disk back to the template snapshot (VC must be stopped).",
            "info": "Nodes, host of each, state, address, disk unique/shared.",
        }[op]
        vc_app.command(op)(cmd)

    _make(_op)


@vc_app.command("destroy")
def vc_destroy(name: str, force: bool = typer.Option(False, "--force", help="also when running (stops it first)")) -> None:
    """Delete a VC: its VMs, disks, swap, seeds and saved states."""
    vc_call("vc.destroy", name=name, force=force)


@vc_app.command("remap")
def vc_remap(
    name: str, strategy: str | None = typer.Option(None, "--strategy"), mode: str | None = typer.Option(None, "--mode"),
) -> None:
    """Change the VM -> host mapping while the VC is suspended or stopped."""
    vc_call("vc.remap", name=name, strategy=strategy, mode=mode)


@vc_app.command("update")
def vc_update(name: str, template: str = typer.Option(..., "--template", help="TEMPLATE@SNAPSHOT")) -> None:
    """Rebase every node disk onto a newer template snapshot (VC must be stopped)."""
    vc_call("vc.update", name=name, template=template)


@vc_app.command("list")
def vc_list() -> None:
    call("vc.list", ["name", "template", "nodes", "running", "state", "subnet", "egress", "hosts", "strategy", "mode"])


@vm_app.command("console")
def vm_console(
    ref: str = typer.Argument(..., help="VC/NODE"), follow: bool = typer.Option(False, "--follow", "-f"),
    raw: bool = typer.Option(False, "--raw", help="the guest's bytes as they are, terminal escapes included"),
) -> None:
    """Print a VM's console log (-f to follow); control sequences escaped unless --raw."""
    offset = 0
    while True:
        r = State.client().call("vm.console", ref=ref, offset=offset)
        sys.stdout.write(r["text"] if raw else render.printable(r["text"]))
        sys.stdout.flush()
        offset = r["offset"]
        if not follow:
            return
        time.sleep(0.5)


@vm_app.command("exec")
def vm_exec(ref: str = typer.Argument(..., help="VC/NODE"), script: str = typer.Argument(...),
            timeout: float = typer.Option(30.0, "--timeout"),
            raw: bool = typer.Option(False, "--raw", help="the output as it is, terminal escapes included")) -> None:
    """Run a shell command in a guest (through its agent serial port); output escaped unless --raw."""
    r = State.client().call("vm.exec", ref=ref, script=script, timeout=timeout)
    if State.json:
        render.emit(r, True)
    else:
        sys.stdout.write(r["output"] if raw else render.printable(r["output"]))
    if r["rc"]:
        raise typer.Exit(r["rc"])


lab_app = typer.Typer(no_args_is_help=True, help="A lab of N hosts on this machine (network namespaces)")
net_app = typer.Typer(no_args_is_help=True, help="VC networks")
app.add_typer(lab_app, name="lab")
app.add_typer(net_app, name="net")


@net_app.command("list")
def net_list() -> None:
    """The private subnet of every VC, its gateway and its nodes' addresses."""
    call("net.list", ["vc", "subnet", "egress", "gateway", "nodes", "addresses", "hosts"])


@lab_app.command("up")
def lab_up(
    hosts: int = typer.Option(3, "--hosts"), prefix: str = typer.Option("10.213.0", "--prefix", help="first three octets of the hosts' /24"),
    cores: int = typer.Option(2, "--cores", help="cores each host offers"), memory: str = typer.Option("2G", "--memory"),
    tag: str = typer.Option("vlab", "--tag", help="names the lab's namespaces (TAG-hN) and bridge (TAGbr); at most 8 characters"),
    etcd: bool = typer.Option(False, "--etcd", help="also an etcd cluster, one member per host (TLS with virtua's etcd CA): "
                                                     "the cluster state of `virtua serve --etcd ...`"),
) -> None:
    """Create N namespaced hosts on a bridge and start an agent in each (manager at PREFIX.1:8780)."""
    from virtua.cluster import lab_etcd
    from virtua.cluster.etcd_server import MAX_TXN_OPS
    from virtua.net.lab import Lab

    lab = Lab(tag=tag, prefix=prefix, hosts=hosts)
    home = State.home / "lab"
    Lab.stop_agents(home)
    lab_etcd.stop(home)
    if (home / "lab.json").exists():  # the lab this home had before, whatever its tag or size
        Lab.load(home).destroy()
    lab.create()
    members = lab_etcd.start(lab, home, State.home) if etcd else []
    tokens = lab_join_tokens(lab, home)
    pids = lab.start_agents(home, f"https://{lab.gateway}:8780", cores, memory, tokens)
    serve = f"virtua serve --no-agent --listen {lab.gateway}:10809 --api-listen {lab.gateway}:8780 --host-network {lab.network}"
    out: dict[str, object] = {"bridge": f"{lab.bridge} {lab.gateway}/24",
                              "hosts": [f"{h} {lab.address(h)} (pid {p})" for h, p in pids.items()]}
    if members:
        out["etcd"] = [f"{m.name} {m.client_url}" for m in members]
        serve += f" --etcd {lab_etcd.urls(members)} --etcd-max-txn-ops {MAX_TXN_OPS}"
    out["serve"] = serve
    render.emit(out, State.json)


def lab_join_tokens(lab: Lab, home: Path) -> dict[str, Path]:
    """One join token per lab host, made with the cluster CA in $VIRTUA_HOME/pki (created
    here if `virtua serve` has not run yet; serve then uses the same CA)."""
    from virtua.pki.ca import ClusterCA
    from virtua.pki.files import write_private
    from virtua.pki.tokens import JoinTokens

    ca = ClusterCA.ensure(State.home / "pki", manager_sans=[lab.gateway, "127.0.0.1", "localhost"])
    tokens = JoinTokens(ca.dir / "tokens.json", ca.fingerprint)
    out: dict[str, Path] = {}
    for h in lab.names():
        path = home / h / "join-token"
        token, _ = tokens.create(3600, h)
        write_private(path, f"{token}\n".encode())
        out[h] = path
    return out


@lab_app.command("down")
def lab_down() -> None:
    """Stop the lab's agents and VMs and remove its namespaces and bridge."""
    from virtua.cluster import lab_etcd
    from virtua.net.lab import Lab

    home = State.home / "lab"
    lab = Lab.load(home)
    Lab.stop_agents(home)
    lab_etcd.stop(home)
    lab.destroy()
    render.emit({"removed": [lab.bridge, *(lab.ns(h) for h in lab.names())]}, State.json)
