"""Start the inference service with a production server.

    python -m course_utils.serving                      # FastAPI + uvicorn, the trained CNN, 127.0.0.1:8000
    python -m course_utils.serving --framework flask    # Flask + waitress
    python -m course_utils.serving --model artifacts/02_onnx/cnn.onnx --api-key s3cret --port 9000
    python -m course_utils.serving --model resnet18.onnx   # preprocessing + labels: resnet18.onnx.spec.json

Every option can also come from a ``COURSE_SERVE_*`` environment variable (see ServiceConfig).
"""

from __future__ import annotations

import argparse
import os
import sys

from .service import ServiceConfig, configure_request_logging, warmup_batches

PROG = "python -m course_utils.serving"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    try:
        defaults = ServiceConfig.from_env()
    except ValueError as error:
        parser.error(str(error))
    parser.add_argument("--framework", choices=("fastapi", "flask"), default="fastapi")
    parser.add_argument("--model", default=defaults.model_path,
                        help="model file: .pt/.pth (state_dict or TorchScript), .pt2, .onnx (default: data/ checkpoint)")
    parser.add_argument("--spec", default=defaults.spec_path,
                        help="model spec JSON: input size, resize/crop, mean/std, labels (default: <model>.spec.json "
                             "next to the model if it exists, else the digits spec)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=defaults.api_key,
                        help="require this X-API-Key (default: $COURSE_SERVE_API_KEY, or no auth)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="dynamic batching: most requests per model call (1 turns batching off)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="dynamic batching: longest wait for more requests after the first")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="dynamic batching: inputs that may wait for the model; past it requests get 503 with "
                             "Retry-After (default 256, 0 = no cap; without batching the server's threads bound it)")
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20)
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (fastapi) or waitress threads (flask, default 8)")
    parser.add_argument("--threads", type=int, default=defaults.threads or None,
                        help="intra-op threads per worker, torch or ONNX Runtime (default: cores / workers, at least 1)")
    parser.add_argument("--drain-seconds", type=float, default=defaults.drain_s,
                        help="on SIGTERM, keep serving (with /ready 503) this long before closing (default 0)")
    parser.add_argument("--grace-seconds", type=float, default=defaults.grace_s,
                        help="then finish the accepted requests within this many seconds (default 20)")
    parser.add_argument("--device", default=defaults.device, help="cuda, mps or cpu (default: best available)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.workers < 1:
        parser.error("--max-batch-size and --workers must be >= 1, --max-wait-ms >= 0, --max-upload-mb > 0")
    if args.max_queue < 0:
        parser.error(f"--max-queue must be >= 0 (0 = no cap), got {args.max_queue}")
    if args.drain_seconds < 0 or args.grace_seconds <= 0:
        parser.error("--drain-seconds must be >= 0 and --grace-seconds > 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    if args.model is not None and not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file")
    from .spec import ModelSpec, ModelSpecError

    spec_file = args.spec or (ModelSpec.sidecar(args.model) if args.model else None)
    if args.spec is not None and not os.path.isfile(args.spec):
        parser.error(f"--spec {args.spec}: no such file")
    if spec_file is not None and os.path.isfile(spec_file):
        try:
            ModelSpec.load(spec_file)      # a bad spec is one line here, not a traceback from a worker
        except ModelSpecError as error:
            parser.error(f"model spec {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.workers if args.framework == "fastapi" else 1))
    config = ServiceConfig.from_env(threads=threads, model_path=args.model, spec_path=args.spec, api_key=args.api_key,
                                    device=args.device,
                                    max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                    max_queue=args.max_queue,
                                    max_upload_bytes=int(args.max_upload_mb * 2**20), framework=args.framework,
                                    drain_s=args.drain_seconds, grace_s=args.grace_seconds)
    os.environ.update(config.to_env())  # worker processes rebuild the config from the environment
    from .predictor import ModelLoadError, Predictor
    from .spec import ModelSpec

    try:   # before the port is bound or a worker starts: a broken model file is one line, exit 2
        spec = ModelSpec.load(config.spec_path) if config.spec_path else None
        if args.framework == "fastapi":   # the workers load it again; flask's one process loads it here
            Predictor.load(config.model_path, device=config.device, spec=spec, threads=1).warmup(
                warmup_batches(config.max_batch_size))   # the same batches each worker's warm-up runs
        else:
            from .flask_app import create_app

            app = create_app(config)
    except ModelLoadError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    configure_request_logging()          # one JSON line per /predict request, on stderr
    print(f"serving {args.framework} on http://{args.host}:{args.port} (model: {config.model_path or 'data/ checkpoint'}"
          f"{', spec: ' + config.spec_path if config.spec_path else ''},"
          f" batching: {config.max_batch_size} x {config.max_wait_ms} ms, workers: {args.workers}, threads: {threads},"
          f" auth: {'on' if config.api_key else 'off'})",
          file=sys.stderr, flush=True)
    if args.framework == "fastapi":
        import uvicorn

        from .metrics import multiprocess_metrics

        with multiprocess_metrics(args.workers):   # N workers: every scrape sums them all
            uvicorn.run("course_utils.serving.fastapi_app:create_app_from_env", factory=True, host=args.host,
                        port=args.port, workers=args.workers, log_level="warning",
                        timeout_graceful_shutdown=max(1, round(args.grace_seconds)))
    else:
        from .lifecycle import serve_waitress

        serve_waitress(app, app.extensions["inference_service"], args.host, args.port,
                       threads=max(args.workers, 8) if args.workers == 1 else args.workers,
                       drain_s=args.drain_seconds, grace_s=args.grace_seconds, ident="course-service")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
