"""Locust load test of a running genrec server: a thin GrpcUser whose channel reports every call to Locust.

Headless, 32 users for one minute against a local server (`genrec serve --bundle bundles/demo` or `make serve`):

    locust -f loadtest/locustfile.py --headless -u 32 -r 32 -t 60s --host 127.0.0.1:50051 --csv results/load

GenrecUser mixes the three scenarios (Recommend 6 : Search 3 : Embed 1); `--tags recommend` (or search, embed, or
several) runs only those. --genrec-token (or GENREC_AUTH_TOKEN) sends a bearer token;
--genrec-tls-ca PEM turns TLS on. benchmarks/load.py runs this file against a server it starts itself.

Requests are realistic without any data files: each user asks Info for the embedding size, then a Search with a
random vector returns real catalog items, whose ids make histories and whose titles make text queries.
"""

from __future__ import annotations

# gRPC must cooperate with gevent (which Locust uses) before any channel exists.
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

import random  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402
from locust import User, events, tag, task  # noqa: E402
from locust.exception import LocustError, StopUser  # noqa: E402

from genrec.server.client import Stubs, open_channel  # noqa: E402
from genrec.v1 import embed_pb2, info_pb2, recommend_pb2, search_pb2  # noqa: E402


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--genrec-token", env_var="GENREC_AUTH_TOKEN", default="", help="bearer token")
    parser.add_argument("--genrec-tls-ca", default="", help="PEM root certificates; turns TLS on")
    parser.add_argument("--genrec-max-tasks", type=int, default=0,
                        help="end the test after this many tasks of all users together (0: run for -t)")


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call to Locust: name (the RPC), latency, response size, and the error if any."""

    def __init__(self, environment):
        self.env = environment

    def intercept_unary_unary(self, continuation, details, request):
        start = time.perf_counter()
        response, exception, size = None, None, 0
        try:
            response = continuation(details, request)
            size = response.result().ByteSize()
        except grpc.RpcError as e:
            exception = e
        self.env.events.request.fire(request_type="grpc", name=details.method.rsplit("/", 1)[-1],
                                     response_time=(time.perf_counter() - start) * 1000, response_length=size,
                                     response=response, context=None, exception=exception)
        return response


class GrpcUser(User):
    """A Locust user with genrec stubs over an intercepted channel to `--host` (host:port, no scheme)."""

    abstract = True

    def __init__(self, environment):
        super().__init__(environment)
        if not self.host:
            raise LocustError("give --host HOST:PORT of the genrec server")
        opts = environment.parsed_options
        token = getattr(opts, "genrec_token", "") or None
        tls_ca = getattr(opts, "genrec_tls_ca", "") or None
        self.channel = open_channel(self.host, token=token, tls_ca=tls_ca,
                                    interceptors=(LocustInterceptor(environment),))
        self.stubs = Stubs.of(self.channel)

    def on_stop(self):
        self.channel.close()


_tasks_started = 0  # of all users in this process, for --genrec-max-tasks


class GenrecUser(GrpcUser):
    """The mixed workload: mostly recommendations, some search, a little embedding."""

    timeout = 10.0

    def _count_task(self):
        """A test bounded by work done rather than by time (what a smoke test on a busy machine needs)."""
        global _tasks_started
        limit = self.environment.parsed_options.genrec_max_tasks
        if limit and _tasks_started >= limit:
            if _tasks_started == limit:  # the first user to get here ends the run, once
                _tasks_started += 1
                gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        _tasks_started += 1

    def on_start(self):
        info = self.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=self.timeout)
        self.max_history = info.max_history
        vec = [random.gauss(0, 1) for _ in range(info.embedding_dim)]
        found = self.stubs.search.Search(
            search_pb2.SearchRequest(vector=search_pb2.Vector(values=vec), k=min(50, info.max_k)),
            timeout=self.timeout)
        self.item_ids = [it.item_id for it in found.items]
        self.titles = [it.title for it in found.items]

    @tag("recommend")
    @task(6)
    def recommend(self):
        self._count_task()
        history = random.choices(self.item_ids, k=random.randint(1, self.max_history))
        self.stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=history, k=10,
                                                                      exclude_seen=random.random() < 0.5),
                                       timeout=self.timeout)

    @tag("search")
    @task(3)
    def search(self):
        self._count_task()
        words = random.choice(self.titles).split()
        text = " ".join(random.sample(words, k=max(1, len(words) // 2)))
        self.stubs.search.Search(search_pb2.SearchRequest(text=text, k=10), timeout=self.timeout)

    @tag("embed")
    @task(1)
    def embed(self):
        self._count_task()
        texts = random.sample(self.titles, k=random.randint(1, 4))
        role = random.choice([embed_pb2.ROLE_QUERY, embed_pb2.ROLE_DOCUMENT])
        self.stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[embed_pb2.EmbedInput(text=t) for t in texts],
                                                      role=role), timeout=self.timeout)
