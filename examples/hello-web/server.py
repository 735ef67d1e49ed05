"""hello-web: answers every GET with the instance's address, its PORT and the client."""

import http.server
import os

PORT = int(os.environ["PORT"])


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        instance = self.connection.getsockname()[0]
        body = (
            f"hello from hello-web at {instance}:{PORT} (PORT={PORT}), "
            f"host {self.headers.get('Host')}, path {self.path}\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"{self.client_address[0]} {fmt % args}", flush=True)


http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Hello).serve_forever()
