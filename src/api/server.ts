import type { Http2Server, ServerHttp2Session } from "node:http2";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import type { Config } from "../config/config.js";
import { ImagePulls } from "../execution/image-pulls.js";
import type { Farm } from "../farm/farm.js";
import { ImagesService } from "../gen/berth/image/v1/image.js";
import { WorkerHubService } from "../gen/berth/worker/v1/worker.js";
import {
  ActionCacheService,
  CapabilitiesService,
  ContentAddressableStorageService,
  ExecutionService,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { OperationsService } from "../gen/google/longrunning/operations.js";
import type { Logger } from "../log/log.js";
import { actionCacheService } from "./action-cache-service.js";
import { FastByteStreamService } from "./bytestream-codec.js";
import { byteStreamService } from "./bytestream-service.js";
import { capabilitiesService } from "./capabilities-service.js";
import { casService } from "./cas-service.js";
import { executionService } from "./execution-service.js";
import { imagesService } from "./images-service.js";
import { InstanceNames } from "./instance-names.js";
import { guardDeserializers, refuseMalformedRequests } from "./malformed-requests.js";
import { operationsService } from "./operations-service.js";
import { workerHubService } from "./worker-hub-service.js";

export interface RunningServer {
  /** HOST:PORT actually bound (the port is chosen by the OS when the configured one is 0). */
  readonly address: string;
  close(): Promise<void>;
}

/**
 * HTTP/2 receive window per connection and per stream. With the protocol's
 * default of 64 KiB a client can have only that much of an upload in flight,
 * which caps ByteStream writes far below what the disk takes.
 */
const RECEIVE_WINDOW_BYTES = 16 * 1024 * 1024;

/**
 * grpc-js reads its window option only on the client side, so the server's
 * HTTP/2 sessions are widened here as they open. The servers are reached
 * through a private field; if a future grpc-js lacks it, its defaults stay.
 */
export function widenReceiveWindows(server: Server, bytes = RECEIVE_WINDOW_BYTES): void {
  const http2Servers = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(http2Servers instanceof Map)) return;
  for (const http2Server of http2Servers.keys() as Iterable<Http2Server>) {
    http2Server.on("session", (session: ServerHttp2Session) => {
      session.setLocalWindowSize(bytes);
      session.settings({ initialWindowSize: bytes });
    });
  }
}

/** Room for a full batch plus the per-blob framing around it. */
const MESSAGE_OVERHEAD_BYTES = 8 * 1024 * 1024;

export async function startServer(farm: Farm, config: Config, log: Logger): Promise<RunningServer> {
  const server = new Server({
    "grpc.max_receive_message_length": config.cas.maxBatchTotalSizeBytes + MESSAGE_OVERHEAD_BYTES,
    "grpc.max_send_message_length": config.cas.maxBatchTotalSizeBytes + MESSAGE_OVERHEAD_BYTES,
    interceptors: [refuseMalformedRequests],
  });
  // Every service's requests are deserialized without throwing, so bad input is INVALID_ARGUMENT, never INTERNAL.
  const addService: Server["addService"] = (service, implementation) =>
    server.addService(guardDeserializers(service), implementation);
  const instances = new InstanceNames(config.instanceNames);
  addService(
    CapabilitiesService,
    capabilitiesService(
      {
        maxBatchTotalSizeBytes: config.cas.maxBatchTotalSizeBytes,
        maxCasBlobSizeBytes: config.cas.maxSizeBytes,
        allowAbsoluteSymlinks: config.cas.allowAbsoluteSymlinks,
        executionEnabled: true,
      },
      instances,
      log,
    ),
  );
  addService(
    ContentAddressableStorageService,
    casService(farm.cas, instances, { maxBatchTotalSizeBytes: config.cas.maxBatchTotalSizeBytes }, log),
  );
  addService(FastByteStreamService, byteStreamService(farm.cas, farm.uploads, instances, log));
  addService(
    ActionCacheService,
    actionCacheService(farm.ac, farm.cas, instances, { maxInlineBytes: config.actionCache.maxInlineBytes }, log),
  );

  addService(
    ExecutionService,
    executionService(
      farm.executor,
      farm.scheduler,
      farm.cas,
      instances,
      { maxInlineBytes: config.actionCache.maxInlineBytes },
      log,
    ),
  );
  addService(OperationsService, operationsService(farm.scheduler, log));
  const pulls = new ImagePulls(farm.images, farm.scheduler);
  addService(ImagesService, imagesService(pulls, farm.images, farm.expander, instances, log));
  addService(
    WorkerHubService,
    workerHubService(
      farm.scheduler,
      farm.cas,
      pulls,
      { heartbeatIntervalMs: config.execution.heartbeatIntervalSeconds * 1000 },
      log,
    ),
  );

  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(config.listen, ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    );
  });
  widenReceiveWindows(server);
  const host = config.listen.slice(0, config.listen.lastIndexOf(":"));
  return {
    address: `${host}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        const force = setTimeout(() => server.forceShutdown(), 5000);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      }),
  };
}
