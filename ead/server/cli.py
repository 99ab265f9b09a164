"""`ead serve`: flags -> load the pair -> the OpenAI-compatible app (ead.server.app) under uvicorn.

Binds to 127.0.0.1 unless --host says otherwise. The API key comes from --api-key or $EAD_API_KEY (the
environment keeps it out of `ps`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ead.config import (
    BACKENDS,
    DEFAULT_MIN_DWELL_TOKENS,
    DEFAULT_THRESHOLD_BITS,
    DEFAULT_WINDOW_TOKENS,
    MODES,
    EngineConfig,
    Role,
    RouterConfig,
    SpeculativeConfig,
)
from ead.errors import ConfigError

EXAMPLES = """examples:
  ead serve                                              # the default pair on http://127.0.0.1:8000/v1
  ead serve --small Qwen/Qwen2.5-1.5B-Instruct --large Qwen/Qwen2.5-14B-Instruct --max-batch 32
  EAD_API_KEY=secret ead serve --host 0.0.0.0 --port 8080 --tau 1.0
  ead serve --small Qwen/Qwen2.5-1.5B-Instruct --large Qwen/Qwen2.5-72B-Instruct --large-tp 2   # large on 2 GPUs
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "ead", "messages": [{"role": "user", "content": "What is 17*23?"}], "ead": {"tau": 0.5}}'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ead.cli import add_model_args, add_parallel_args, add_schedule_arg

    p = subparsers.add_parser("serve", help="serve EAD over an OpenAI-compatible HTTP API",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                              description="Serve the pair at /v1/completions and /v1/chat/completions (streaming, "
                                          "concurrent requests batched together), /v1/models, /health, /metrics. "
                                          "See docs/serve.md.")
    add_model_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="how the models run (see ead generate --help)")
    add_parallel_args(p)
    rule = p.add_argument_group("the EAD rule (defaults for requests without an 'ead' object)")
    rule.add_argument("--tau", type=float, default=DEFAULT_THRESHOLD_BITS,
                      help=f"entropy threshold in bits (default {DEFAULT_THRESHOLD_BITS})")
    rule.add_argument("--window", type=int, default=DEFAULT_WINDOW_TOKENS,
                      help=f"tokens in the rolling mean (default {DEFAULT_WINDOW_TOKENS})")
    rule.add_argument("--d-min", type=int, default=DEFAULT_MIN_DWELL_TOKENS,
                      help=f"tokens before another switch (default {DEFAULT_MIN_DWELL_TOKENS})")
    rule.add_argument("--start", choices=["small", "large"], default="small", help="model that writes first")
    rule.add_argument("--calibration", metavar="FILE", default=None,
                      help="take the default tau from a file written by `ead calibrate` for this pair")
    spec = p.add_argument_group("speculative decoding (for every request; backends hf, native and llamacpp)")
    spec.add_argument("--mode", choices=MODES, default="ead",
                      help="'ead' (default); 'speculative' = the large model's text, drafted by the small one; "
                           "'hybrid' = EAD with its large segments written by speculation")
    spec.add_argument("--gamma", type=int, default=4, help="most tokens drafted per large-model pass (default 4)")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $EAD_API_KEY, else no key)")
    srv.add_argument("--model-name", default="ead", help="the model id clients send and /v1/models lists "
                                                         "(default 'ead')")
    srv.add_argument("--max-batch", type=int, default=16, help="requests generated together (default 16)")
    add_schedule_arg(srv, "it applies to every request (docs/engine.md)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests waiting for a batch slot before new ones get 429 (default 64)")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (default 1 MiB)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ead.server.app import ServeConfig, create_app
    except ModuleNotFoundError as e:
        raise ConfigError(f"ead serve needs {e.name}, which is not installed: pip install 'ead[serve]'") from None
    from ead.cli import load

    router = RouterConfig(threshold_bits=args.tau, window_tokens=args.window, min_dwell_tokens=args.d_min,
                          start=Role(args.start))
    if args.max_batch < 1 or args.max_queue < 0 or args.max_body_bytes < 1:
        raise ConfigError("--max-batch must be >= 1, --max-queue >= 0 and --max-body-bytes >= 1")
    api_key = args.api_key or os.environ.get("EAD_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it "
              "(--api-key or $EAD_API_KEY)", file=sys.stderr)
    pair = load(args)
    if args.calibration:
        from ead.calibrate import load_calibration
        from ead.routing import RoutingConfig

        tau = load_calibration(args.calibration, pair, RoutingConfig.from_router_config(router))
        router = RouterConfig(threshold_bits=tau, window_tokens=args.window, min_dwell_tokens=args.d_min,
                              start=Role(args.start))
    cfg = ServeConfig(model_name=args.model_name, api_key=api_key, max_body_bytes=args.max_body_bytes, router=router)
    engine_cfg, speculative = EngineConfig(backend=args.backend), SpeculativeConfig(max_draft_tokens=args.gamma)
    mirror = None
    if pair.large_tp > 1:  # every rank runs an engine over the same requests; rank 0 alone serves HTTP
        import torch.distributed as dist

        from ead.launch import rank0_channel
        from ead.server.app import engine_factory
        from ead.server.worker import follow

        send, receive = rank0_channel()
        if dist.get_rank() > 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops rank 0's server, which then stops this rank
            follow(engine_factory(pair, cfg, engine_cfg, args.max_batch, args.mode, speculative, args.schedule),
                   receive)
            return 0
        mirror = send
    app = create_app(pair, cfg, engine_cfg, max_batch=args.max_batch, max_queue=args.max_queue, mode=args.mode,
                     speculative=speculative, mirror=mirror, schedule=args.schedule)
    print(f"serving {args.model_name!r} ({pair.small.source} -> {pair.large.source}) at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
