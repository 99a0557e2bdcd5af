"""The Jupyter face's REST routes: /api, kernel specs and kernels, with Jupyter Server's shapes."""

from __future__ import annotations

import mimetypes

from gateway import __version__
from gateway.api_spec import Body, Field
from gateway.handlers.base import BaseHandler

KID = r"(?P<kernel_id>[0-9a-fA-F-]{1,64})"
SPEC = r"(?P<name>[A-Za-z0-9._-]{1,128})"
NEW_KERNEL = Body((Field("name", (str,), "the kernel spec"), Field("env", (dict,), "KERNEL_* variables"),
                   Field("path", (str,), "ignored: kernels start in their session's workspace")))


class ApiHandler(BaseHandler):
    async def get(self) -> None:
        self.write_json({"version": __version__, "gateway": "agent-kernel-gateway"})


class KernelSpecsHandler(BaseHandler):
    async def get(self) -> None:
        self.write_json(self.gateway.jupyter.specs())


class KernelSpecHandler(BaseHandler):
    async def get(self, name: str) -> None:
        self.write_json(self.gateway.jupyter.spec_model(name))


class KernelSpecResourceHandler(BaseHandler):
    async def get(self, name: str, filename: str) -> None:
        path = self.gateway.jupyter.spec_resource(name, filename)
        self.set_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.finish(path.read_bytes())


class KernelsHandler(BaseHandler):
    """GET lists the kernels the caller may see; POST starts one (a new session)."""

    async def get(self) -> None:
        assert self.principal is not None
        self.write_json(self.gateway.jupyter.list(self.principal))

    async def post(self) -> None:
        assert self.principal is not None
        body = self.json_body(NEW_KERNEL)
        model = await self.gateway.jupyter.start(self.principal, body.get("name"), body.get("env"))
        self.set_header("Location", f"/api/kernels/{model['id']}")
        self.write_json(model, status=201)


class KernelHandler(BaseHandler):
    async def get(self, kernel_id: str) -> None:
        assert self.principal is not None
        self.write_json(self.gateway.jupyter.get(self.principal, kernel_id))

    async def delete(self, kernel_id: str) -> None:
        assert self.principal is not None
        terminate = self.get_query_argument("terminate", "false").lower() in ("1", "true", "yes")
        await self.gateway.jupyter.delete(self.principal, kernel_id, terminate=terminate)
        self.set_status(204)
        self.finish()


class KernelInterruptHandler(BaseHandler):
    async def post(self, kernel_id: str) -> None:
        self.json_value()  # Jupyter clients send {} (or nothing); whatever comes must be well-formed JSON
        assert self.principal is not None
        await self.gateway.jupyter.interrupt(self.principal, kernel_id)
        self.set_status(204)
        self.finish()


class KernelRestartHandler(BaseHandler):
    async def post(self, kernel_id: str) -> None:
        self.json_value()  # as for interrupt: the body is not used, but must be well-formed JSON
        assert self.principal is not None
        self.write_json(await self.gateway.jupyter.restart(self.principal, kernel_id))


routes = [
    (r"/api", ApiHandler),
    (r"/api/kernelspecs", KernelSpecsHandler),
    (rf"/api/kernelspecs/{SPEC}", KernelSpecHandler),
    (rf"/kernelspecs/{SPEC}/(?P<filename>[^/]+)", KernelSpecResourceHandler),
    (r"/api/kernels", KernelsHandler),
    (rf"/api/kernels/{KID}", KernelHandler),
    (rf"/api/kernels/{KID}/interrupt", KernelInterruptHandler),
    (rf"/api/kernels/{KID}/restart", KernelRestartHandler),
]
