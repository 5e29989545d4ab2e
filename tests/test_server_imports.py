"""The library stays free of the server stack: `import molmo_edge.runtime` (and the session, the CLI's entry)
must not import uvicorn, Starlette, pydantic, prometheus_client or molmo_edge.runtime.serve's server."""
import subprocess
import sys


def test_library_does_not_import_the_server_stack():
    code = ("import sys, molmo_edge.runtime, molmo_edge.runtime.session, molmo_edge.runtime.cli.main; "
            "bad = [m for m in ('uvicorn', 'starlette', 'pydantic', 'prometheus_client', 'python_multipart', "
            "'molmo_edge.runtime.serve.server', 'molmo_edge.runtime.serve.app') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
