"""Server configuration: typed, frozen, validated once at the edge (the CLI builds it; create_server reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator

from genrec.core.config import Frozen


class BatchingConfig(Frozen):
    """The micro-batching policy of each request queue (Recommend, Embed and Search have one each)."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="requests computed together; 1 turns batching off")
    max_wait_ms: float = Field(
        2.0, ge=0.0, le=10_000.0,
        description="how long the oldest queued request waits for others to fill a batch; 0 = take what is queued")
    search_max_wait_ms: float = Field(
        0.0, ge=0.0, le=10_000.0,
        description="the Search queue's wait: a search of one vector (about 0.1 ms at 1M items with HNSW) costs less "
                    "than any wait would save, so by default it takes what is queued")
    max_queue: int = Field(
        128, ge=1, le=100_000,
        description="requests waiting per queue; more are refused with RESOURCE_EXHAUSTED instead of queueing")


MAX_VECTOR_DIMS = 8192  # the widest Search vector a request may carry (the served bundle's dimension is checked)


class LimitsConfig(Frozen):
    """Input limits; requests beyond them get INVALID_ARGUMENT with the limit in the message."""

    max_k: int = Field(100, ge=1, le=10_000, description="largest k for Recommend and Search")
    max_beam_width: int = Field(128, ge=1, le=4096, description="largest beam width a client may ask for")
    max_ved_budget: int = Field(64, ge=1, le=1_000_000, description="largest VED budget (model forwards) a client "
                                "may ask for; 64 takes about 110-130 ms alone on the Beauty bundle on 2 cores, 128 "
                                "about 280 ms (benchmarks/limits.py, goal 250 ms): rerun it for other hardware")
    max_history_items: int = Field(
        1000, ge=1, le=1_000_000, description="longest history accepted (the model reads only its last max_history)")
    max_inputs: int = Field(64, ge=1, le=4096, description="texts/images per Embed request")
    max_text_chars: int = Field(4096, ge=1, le=1_000_000, description="characters per text")
    max_image_bytes: int = Field(4 << 20, ge=1, description="bytes per encoded image")
    max_message_bytes: int = Field(16 << 20, ge=1 << 16, le=1 << 30,
                                   description="largest gRPC message received or sent")

    def request_bytes(self, method: str) -> int:
        """The wire size of the largest request of `method` ("Service/Method") that these limits accept: a larger
        one is refused before it is parsed, so no request costs more memory than a valid one could."""
        slack, text = 4096, 4 * self.max_text_chars + 16  # tags and small fields; UTF-8 is at most 4 bytes a char
        sizes = {"RecommendService/Recommend": 11 * self.max_history_items,  # a varint item id: at most 10 bytes
                 "EmbedService/Embed": self.max_inputs * (max(text, self.max_image_bytes) + 16),
                 "SearchService/Search": text + self.max_image_bytes + 5 * MAX_VECTOR_DIMS,
                 "InfoService/GetInfo": 0, "AdminService/Reload": 4096}
        return min(sizes.get(method, self.max_message_bytes) + slack, self.max_message_bytes)

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_beam_width < self.max_k:
            raise ValueError(f"max_beam_width ({self.max_beam_width}) must be at least max_k ({self.max_k}): "
                             "beam search needs a beam as wide as k")
        if self.max_image_bytes >= self.max_message_bytes:
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) must be below max_message_bytes "
                             f"({self.max_message_bytes}), or oversized images never reach validation")
        return self


class ServerConfig(Frozen):
    """Everything `create_server` needs."""

    bundle: Path = Field(description="bundle directory to serve (see `genrec build` and `genrec train sft`)")
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 or [::] for all)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: Optional[int] = Field(
        9090, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one, None turns it off")
    batching: BatchingConfig = BatchingConfig()
    cheap_beam_width: int = Field(
        32, ge=1, le=4096,
        description="Recommend calls with beam search up to this width use the recommend queue; VED calls and wider "
        "beams use their own queue (recommend-heavy: its own worker, batches of at most heavy_batch_size), so an "
        "expensive call never makes a cheap one wait for its batch")
    heavy_batch_size: int = Field(4, ge=1, le=1024, description="largest batch of the recommend-heavy queue")
    limits: LimitsConfig = LimitsConfig()
    max_concurrent_rpcs: int = Field(
        512, ge=1, le=100_000,
        description="RPCs admitted at once (each holds a thread while queued); gRPC refuses more with "
                    "RESOURCE_EXHAUSTED")
    threads: int = Field(
        0, ge=0, le=1024, description="compute threads of torch, FAISS and ONNX Runtime; 0 = every core this "
        "process may use (`--workers N` gives each worker its share)")
    device: str = Field("auto", validate_default=True,
                        description="device of the recommender, the embedder and (with faiss-gpu) the index: "
                        "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="embedder runtime: torch, or onnx (onnxruntime on the bundle's embedder.onnx; see "
        "`genrec embedder export-onnx`)")
    grace_s: float = Field(10.0, ge=0.0, le=3600.0,
                           description="on shutdown, how long in-flight requests may take to finish")
    drain_s: float = Field(
        1.0, ge=0.0, le=600.0,
        description="on shutdown, how long health reports NOT_SERVING before new calls are refused, so clients "
        "that check health (genrec's round-robin client, load balancers) move away first; at most grace_s")
    auth_token: Optional[SecretStr] = Field(
        None, description="require `authorization: Bearer TOKEN` on genrec.v1 calls (health and reflection stay open)")
    tls_cert: Optional[Path] = Field(None, description="PEM certificate chain; with tls_key, serve TLS")
    tls_key: Optional[Path] = Field(None, description="PEM private key of tls_cert")
    reload_root: Optional[Path] = Field(
        None, description="Admin Reload loads only bundle directories under this one (default: the directory that "
        "holds the served bundle)")
    allow_unauthenticated_reload: bool = Field(
        False, description="accept Admin Reload without a bearer token configured; off, Reload needs auth_token "
        "(SIGHUP, sent by whoever runs the process, always reloads the served path)")
    reuse_port: bool = Field(
        False, description="bind with SO_REUSEPORT, so several server processes share the port (`--workers`); off, "
        "a second server on a taken port fails instead of silently sharing it")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from genrec.core.device import resolve_device

        return str(resolve_device(value))  # auto becomes what this machine has; a device it lacks is refused

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither for plaintext)")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.tls_cert is not None:  # gRPC reports a bad PEM only when binding, as if the port were taken
            import ssl

            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"TLS certificate {self.tls_cert} and key {self.tls_key} do not load ({e}): give "
                                 "a PEM certificate chain and its unencrypted PEM private key") from None
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("auth_token is empty: give a token, or leave it unset to turn auth off")
        return self
