"""tcp-echo: echoes every byte each TCP client sends on PORT, many clients at once."""

import asyncio
import os
import signal

PORT = int(os.environ["PORT"])


async def echo(reader, writer):
    peer = "%s:%s" % writer.get_extra_info("peername")[:2]
    print(f"{peer} connected", flush=True)
    total = 0
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            total += len(data)
    except ConnectionError:
        pass
    finally:
        writer.close()
    print(f"{peer} closed after {total} bytes", flush=True)


async def main():
    server = await asyncio.start_server(echo, "0.0.0.0", PORT)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"tcp-echo listening on tcp/{PORT}", flush=True)
    await stop.wait()
    server.close()
    print("tcp-echo stopping on SIGTERM", flush=True)


asyncio.run(main())
