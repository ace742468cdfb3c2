/**
 * A ByteStream server that stores nothing: Write counts the bytes and drops them, Read streams
 * bytes from memory. Run as its own process by the ByteStream benchmark, it shows what gRPC
 * (grpc-js and the same codec, message limits and HTTP/2 windows as Berth's server) costs on this machine
 * without any storage: the ceiling for Berth's ByteStream.
 */
import { once } from "node:events";
import { fileURLToPath } from "node:url";
import { Metadata, Server, ServerCredentials, type ServiceError, status } from "@grpc/grpc-js";
import { FastByteStreamService } from "../src/api/bytestream-codec.js";
import { widenReceiveWindows } from "../src/api/server.js";
import { parseReadResourceName, parseWriteResourceName } from "../src/digest/resource-name.js";
import type { ByteStreamServer, WriteRequest } from "../src/gen/google/bytestream/bytestream.js";
import { type ServerProcess, spawnListening } from "../test/support/farm.js";

const CHUNK_BYTES = 1024 * 1024;
/** As Berth's server: room for a batch of 4 MiB plus framing. */
const MESSAGE_LIMIT = 12 * 1024 * 1024;

function failure(message: string): ServiceError {
  return Object.assign(new Error(message), {
    code: status.INVALID_ARGUMENT,
    details: message,
    metadata: new Metadata(),
  });
}

async function serve(): Promise<void> {
  let content = Buffer.alloc(0);
  const server = new Server({
    "grpc.max_receive_message_length": MESSAGE_LIMIT,
    "grpc.max_send_message_length": MESSAGE_LIMIT,
  });
  const service: ByteStreamServer = {
    write: (call, callback) => {
      let written = 0;
      let size = -1;
      let error: ServiceError | undefined;
      call.on("data", (request: WriteRequest) => {
        if (size < 0) size = parseWriteResourceName(request.resourceName).digest.sizeBytes;
        if (request.writeOffset !== written) error ??= failure(`write_offset ${request.writeOffset} is not ${written}`);
        written += request.data.byteLength;
      });
      call.on("end", () => {
        if (written !== size) error ??= failure(`${written} bytes were sent for a blob of ${size}`);
        callback(error ?? null, { committedSize: written });
      });
    },
    read: (call) => {
      const size = parseReadResourceName(call.request.resourceName).digest.sizeBytes;
      if (content.byteLength < size) content = Buffer.alloc(size, 0x5a);
      void (async () => {
        for (let offset = 0; offset < size && !call.cancelled; offset += CHUNK_BYTES) {
          const data = content.subarray(offset, Math.min(size, offset + CHUNK_BYTES));
          if (!call.write({ data })) await once(call, "drain");
        }
        call.end();
      })();
    },
    queryWriteStatus: (_call, callback) => callback(null, { committedSize: 0, complete: false }),
  };
  server.addService(FastByteStreamService, service);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    ),
  );
  widenReceiveWindows(server);
  process.stdout.write(`null server listening on 127.0.0.1:${port}\n`);
  process.once("SIGTERM", () => {
    server.forceShutdown();
    process.exit(0);
  });
}

/** The null server as a child process, with its address. */
export type NullServer = ServerProcess;

export function spawnNullServer(): Promise<NullServer> {
  return spawnListening([fileURLToPath(import.meta.url), "serve"], /null server listening on (\S+)/, "the null server");
}

if (process.argv[1] === fileURLToPath(import.meta.url) && process.argv[2] === "serve") {
  serve().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
