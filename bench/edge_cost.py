"""What a change to the edge costs: two Envoys in front of one gRPC server, one with gateway/envoy.yaml as it is and
one with the version of a git revision, requests interleaved so that both see the same minutes of this machine.
Each round sends `GET /v1/models` (the edge's own work dominates) and a 1-token chat completion to each.

    PYTHONPATH=services:build/gen/python .venv/bin/python bench/edge_cost.py --against 972ef01 --requests 400
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from chatwire_server.edge import stack

CHAT = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision whose gateway/envoy.yaml to compare")
    parser.add_argument("--requests", type=int, default=400, help="rounds (each: one of each request per edge)")
    args = parser.parse_args()
    show = ["git", "-C", str(stack.REPO), "show", f"{args.against}:gateway/envoy.yaml"]
    templates = {args.against: subprocess.run(show, capture_output=True, text=True, check=True).stdout}
    templates["working tree"] = stack.ENVOY_TEMPLATE.read_text()
    logs = Path(tempfile.mkdtemp(prefix="chatwire-edge-cost-"))
    grpc_port = stack.free_port()
    server = stack.start_server(grpc_port, (logs / "server.log").open("wb"))
    envoys = []
    try:
        stack.wait_for_server(grpc_port, server)
        clients = {}
        for i, (name, template) in enumerate(templates.items()):
            ports = stack.Ports(http=stack.free_port(), grpc=grpc_port, admin=stack.free_port())
            config = logs / f"envoy-{i}.yaml"
            config.write_text(stack.render_envoy_config(ports, template=template))
            envoys.append(stack.start_envoy(config, ports.admin, (logs / f"envoy-{i}.log").open("wb")))
            stack.wait_for_envoy(ports.admin, envoys[-1])
            clients[name] = httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=30)
        time.sleep(stack.HOSTS_SETTLE_S + 2)  # health checks pass on both
        seconds: dict[tuple[str, str], list[float]] = {(n, k): [] for n in clients for k in ("models", "chat")}
        for round_ in range(args.requests):
            for name in list(clients)[:: 1 if round_ % 2 else -1]:  # alternate which edge goes first
                for kind, send in (
                    ("models", lambda c: c.get("/v1/models")),
                    ("chat", lambda c: c.post("/v1/chat/completions", json=CHAT)),
                ):
                    start = time.perf_counter()
                    send(clients[name]).raise_for_status()
                    seconds[(name, kind)].append(time.perf_counter() - start)
        for (name, kind), values in sorted(seconds.items(), key=lambda item: (item[0][1], item[0][0])):
            print(
                f"{kind:6s} {name:12s} p50 {statistics.median(values) * 1000:6.2f} ms  "
                f"mean {statistics.mean(values) * 1000:6.2f} ms  ({len(values)} requests)"
            )
    finally:
        for process in (*envoys, server):
            stack.stop(process)


if __name__ == "__main__":
    main()
