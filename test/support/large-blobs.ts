import { randomUUID } from "node:crypto";
import type { WireDigest } from "./blobs.js";
import type { Clients } from "./farm.js";

/** Uploads one blob of any size through ByteStream.Write in 1 MiB chunks, waiting when the stream is full. */
export async function uploadLargeBlob(clients: Clients, blob: { data: Buffer; digest: WireDigest }): Promise<void> {
  const chunk = 1024 * 1024;
  await new Promise<void>((resolve, reject) => {
    const call = clients.byteStream.write((err) => (err ? reject(err) : resolve()));
    const resourceName = `uploads/${randomUUID()}/blobs/${blob.digest.hash}/${blob.digest.sizeBytes}`;
    let offset = 0;
    const pump = () => {
      while (offset < blob.data.byteLength) {
        const data = blob.data.subarray(offset, offset + chunk);
        const finishWrite = offset + data.byteLength === blob.data.byteLength;
        const more = call.write({
          resourceName: offset === 0 ? resourceName : "",
          writeOffset: offset,
          finishWrite,
          data,
        });
        offset += data.byteLength;
        if (!more) {
          call.once("drain", pump);
          return;
        }
      }
      call.end();
    };
    pump();
  });
}
