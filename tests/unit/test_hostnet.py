"""The nftables rule set of a host, rendered from its VMs (pure), then loaded into a
real kernel in a scratch network namespace to prove it parses."""

from __future__ import annotations

import subprocess
import uuid

from virtua.net.hostnet import LocalVM, render_ruleset

A1 = LocalVM("vtaaaa1", "10.200.0.2", "10.200.0.0/29", "a")
B1 = LocalVM("vtbbbb1", "10.200.0.10", "10.200.0.8/29", "b")


def test_no_vms_means_no_table() -> None:
    script = render_ruleset([], ["10.200.0.0/29"])
    assert script.strip().splitlines() == ["table inet virtua {}", "delete table inet virtua"]


def test_rules_isolate_and_block_spoofing() -> None:
    script = render_ruleset([A1, B1], ["10.200.0.0/29", "10.200.0.8/29"])
    assert 'iifname "vtaaaa1" ip saddr != 10.200.0.2 counter drop' in script
    assert 'iifname "vtaaaa1" ip daddr != 10.200.0.0/29 ip daddr { 10.200.0.0/29, 10.200.0.8/29 } counter drop' in script
    assert 'oifname "vtbbbb1" ip saddr != 10.200.0.8/29 ip saddr { 10.200.0.0/29, 10.200.0.8/29 } counter drop' in script
    # no accept verdicts: one VM's rule can never let another VM's spoofed packet through
    assert "accept;" in script and " accept\n" not in script and "accept comment" not in script
    # every anti-spoofing rule comes before any other rule of the chain
    forward = script.split("chain forward")[1].split("chain input")[0]
    kinds = [line.split("comment")[-1].strip() for line in forward.splitlines() if "comment" in line]
    first_other = next(i for i, k in enumerate(kinds) if "spoofed" not in k and "IPv4" not in k)
    assert all("spoofed" in k or "IPv4" in k for k in kinds[:first_other])
    assert not any("spoofed" in k for k in kinds[first_other:])


def test_ruleset_loads_into_the_kernel() -> None:
    ns = f"vtchk{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        script = render_ruleset([A1, B1], ["10.200.0.0/29", "10.200.0.8/29"])
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "virtua"],
                                capture_output=True, text=True, check=True).stdout
        assert "spoofed source" in listed
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=render_ruleset([], []),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "virtua"],
                           capture_output=True, text=True)
        assert r.returncode != 0, "an empty rule set leaves no table behind"
    finally:
        subprocess.run(["ip", "netns", "del", ns])
