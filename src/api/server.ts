import { chmod, readFile, rm } from "node:fs/promises";
import type { Http2Server, ServerHttp2Session } from "node:http2";
import { join } from "node:path";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import { openAssetStore } from "../asset/open-asset-store.js";
import { AccessPolicy, type Grant } from "../auth/access.js";
import { accessInterceptor, requestInstanceName } from "../auth/access-interceptor.js";
import { loadClientTokens } from "../auth/client-tokens.js";
import { readPrivateFile } from "../auth/private-file.js";
import { SecretTable, secretDigest } from "../auth/secrets.js";
import { ensureWorkerToken, readTokenFile, workerTokenPath } from "../auth/token-file.js";
import type { Config } from "../config/config.js";
import { ImagePulls } from "../execution/image-pulls.js";
import type { Farm } from "../farm/farm.js";
import { ImagesService } from "../gen/berth/image/v1/image.js";
import { WorkerHubService } from "../gen/berth/worker/v1/worker.js";
import { FetchService, PushService } from "../gen/build/bazel/remote/asset/v1/remote_asset.js";
import {
  ActionCacheService,
  CapabilitiesService,
  ContentAddressableStorageService,
  ExecutionService,
} from "../gen/build/bazel/remote/execution/v2/remote_execution.js";
import { OperationsService } from "../gen/google/longrunning/operations.js";
import type { Logger } from "../log/log.js";
import { actionCacheService } from "./action-cache-service.js";
import { fetchService, pushService } from "./asset-service.js";
import { FastByteStreamService } from "./bytestream-codec.js";
import { byteStreamService } from "./bytestream-service.js";
import { callLogInterceptor } from "./call-log.js";
import { capabilitiesService } from "./capabilities-service.js";
import { casService } from "./cas-service.js";
import { executionService } from "./execution-service.js";
import { imagesService } from "./images-service.js";
import { InstanceNames } from "./instance-names.js";
import { guardDeserializers, isMalformed, refuseMalformedRequests } from "./malformed-requests.js";
import { operationsService } from "./operations-service.js";
import { routeUnknownMethods } from "./unknown-methods.js";
import { workerHubService } from "./worker-hub-service.js";

export interface RunningServer {
  /** HOST:PORT actually bound (the port is chosen by the OS when the configured one is 0). */
  readonly address: string;
  /**
   * Where this host's own workers connect: the TCP address, or with TLS on a
   * Unix socket in the data directory (root only), so they need neither a
   * certificate nor a name the server's certificate covers.
   */
  readonly workerAddress: string;
  /** The file holding the secret this farm's own workers present. */
  readonly workerTokenFile: string;
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
  const workerTokenFile = workerTokenPath(config.dataDir);
  const access = await accessPolicy(config, workerTokenFile);
  const operationInstance = (name: string) => farm.scheduler.getOperation(name)?.instanceName;
  const server = new Server({
    "grpc.max_receive_message_length": config.cas.maxBatchTotalSizeBytes + MESSAGE_OVERHEAD_BYTES,
    "grpc.max_send_message_length": config.cas.maxBatchTotalSizeBytes + MESSAGE_OVERHEAD_BYTES,
    // In order of the request's events: the call log sees the call first and its answer last, whoever gives
    // it; a request that does not decode is refused before its instance name is read; the caller's
    // credentials (in the metadata, which comes first) are checked before either.
    interceptors: [
      callLogInterceptor(log, (path, request) =>
        isMalformed(request) ? undefined : requestInstanceName(path, request, operationInstance),
      ),
      refuseMalformedRequests,
      accessInterceptor(access, operationInstance, log),
    ],
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
    casService(
      farm.cas,
      instances,
      {
        maxBatchTotalSizeBytes: config.cas.maxBatchTotalSizeBytes,
        maxDirectoryBytes: config.execution.inputLimits.maxDirectoryBytes,
      },
      log,
    ),
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
  const assets = await openAssetStore(config, farm, log);
  addService(FetchService, fetchService(assets, instances, log));
  addService(PushService, pushService(assets, instances, log));
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

  // Calls of methods no service offers pass through the interceptors too (and so reach the call log).
  routeUnknownMethods(server);

  const bind = (address: string, credentials: ServerCredentials) =>
    new Promise<number>((resolve, reject) => {
      server.bindAsync(address, credentials, (err, bound) => (err ? reject(err) : resolve(bound)));
    });
  const port = await bind(config.listen, await serverCredentials(config.tls));
  const host = config.listen.slice(0, config.listen.lastIndexOf(":"));
  let workerAddress = `${host}:${port}`;
  if (config.tls) {
    const socket = join(config.dataDir, "worker.sock");
    await rm(socket, { force: true });
    await bind(`unix:${socket}`, ServerCredentials.createInsecure());
    await chmod(socket, 0o600);
    workerAddress = `unix:${socket}`;
  }
  widenReceiveWindows(server);
  log.info(
    { tls: config.tls !== undefined, clientTokens: access.checksClients },
    `gRPC port: ${config.tls ? "TLS" : "plain"}${config.tls?.requireClientCert ? " with client certificates" : ""}, ` +
      `${access.checksClients ? "client tokens checked" : "no client token needed"}, worker token required`,
  );
  return {
    address: `${host}:${port}`,
    workerAddress,
    workerTokenFile,
    close: () =>
      new Promise<void>((resolve) => {
        assets.close();
        const force = setTimeout(() => server.forceShutdown(), 5000);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      }),
  };
}

/** The farm's own worker secret (made on first start), the operator's extra ones, and the client tokens file. */
async function accessPolicy(config: Config, workerTokenFile: string): Promise<AccessPolicy> {
  const workers = new SecretTable<Grant>();
  workers.add(secretDigest(await ensureWorkerToken(workerTokenFile)), {
    name: "the farm's own workers",
    instances: "*",
  });
  for (const file of config.auth.workerTokenFiles) {
    workers.add(secretDigest(await readTokenFile(file)), { name: `worker token ${file}`, instances: "*" });
  }
  const clients = config.auth.tokensFile === undefined ? undefined : await loadClientTokens(config.auth.tokensFile);
  return new AccessPolicy(workers, clients, new Set(config.auth.workerCertificateNames));
}

async function serverCredentials(tls: Config["tls"]): Promise<ServerCredentials> {
  if (!tls) return ServerCredentials.createInsecure();
  const [cert, key, clientCa] = await Promise.all([
    readFile(tls.certFile),
    readPrivateFile(tls.keyFile, "tls.keyFile"),
    tls.clientCaFile === undefined ? undefined : readFile(tls.clientCaFile),
  ]);
  return ServerCredentials.createSsl(clientCa ?? null, [{ cert_chain: cert, private_key: key }], tls.requireClientCert);
}
