"""Run notebooks on gateway kernels from tools that drive a kernel manager (nbclient, papermill).

Built on Jupyter Server's remote-kernel manager and websocket client (install
``agent-kernel-gateway[remote]``); this adds what they leave out for this gateway: the token on
the kernel websocket, and one call to point them at a gateway::

    from nbclient import NotebookClient
    from gateway.remote import RemoteKernelManager, use_gateway

    use_gateway("http://127.0.0.1:8765", token)
    km = RemoteKernelManager()
    NotebookClient(nb, km=km).execute()
    run_sync(km.shutdown_kernel)()      # from jupyter_core.utils; ends the session

Every cell runs as a step of a new session (``source: "jupyter"``).
"""

from __future__ import annotations

from threading import Thread
from typing import Any

import websocket
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_core.utils import ensure_async
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelClient, GatewayKernelManager
from tornado.escape import url_escape
from traitlets import DottedObjectName, Type


def use_gateway(url: str, token: str, request_timeout: float = 60.0) -> GatewayClient:
    """Point Jupyter's gateway client (used by ``RemoteKernelManager``) at a gateway."""
    client = GatewayClient.instance()
    client.url = url.rstrip("/")
    client.auth_token = token
    client.auth_scheme = "token"
    client.request_timeout = request_timeout
    client.init_connection_args()
    return client


class RemoteKernelClient(GatewayKernelClient):
    """Jupyter's gateway websocket client, sending the token on the websocket upgrade too."""

    async def start_channels(self, shell: bool = True, iopub: bool = True, stdin: bool = True,  # type: ignore[override]
                             hb: bool = True, control: bool = True) -> None:
        client = GatewayClient.instance()
        url = "/".join([(client.ws_url or "").rstrip("/"), client.kernels_endpoint.strip("/"),
                        url_escape(self.kernel_id), "channels"])
        self.channel_socket = websocket.create_connection(
            url, timeout=client.KERNEL_LAUNCH_TIMEOUT, enable_multithread=True,
            header=[f"Authorization: {client.auth_scheme} {client.auth_token}"])
        await ensure_async(AsyncKernelClient.start_channels(  # type: ignore[func-returns-value]
            self, shell=shell, iopub=iopub, stdin=stdin, hb=hb, control=control))
        self.response_router = Thread(target=self._route_responses, daemon=True)
        self.response_router.start()


class RemoteKernelManager(GatewayKernelManager):
    """A kernel manager whose kernel is a new session on the gateway set with ``use_gateway``."""

    client_class = DottedObjectName("gateway.remote.RemoteKernelClient")
    client_factory = Type(klass="gateway.remote.RemoteKernelClient")

    def client(self, **kwargs: Any) -> RemoteKernelClient:  # type: ignore[override]
        return super().client(**kwargs)  # type: ignore[no-any-return]

    async def _async_is_alive(self) -> bool:
        """Alive while the gateway still lists the kernel and it is not dead."""
        if not self.has_kernel:
            return False
        model = await self.refresh_model()
        return bool(model) and model.get("execution_state") != "dead"

    is_alive = _async_is_alive
