import type { ServerWritableStream } from "@grpc/grpc-js";
import { SHA256 } from "../digest/functions.js";
import type { ImagePolicy } from "../execution/image-policy.js";
import { admitRequestedImage, type ImagePulls, type StartedPull } from "../execution/image-pulls.js";
import type { ImageExpander } from "../expand/image-expander.js";
import {
  ExpandImageProgress,
  type ExpandImageRequest,
  type ImagesServer,
  type PullImageProgress,
  type PullImageRequest,
} from "../gen/berth/image/v1/image.js";
import type { Logger } from "../log/log.js";
import { normalizeRegistryKey } from "../registry/credentials.js";
import { toServiceError } from "./grpc-status.js";
import { logFailure } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";
import { registryCredentialsFrom } from "./registry-credentials-header.js";

const PROGRESS_INTERVAL_MS = 200;

/** berth.image.v1.Images: image pulls by the workers (mount mode) and expansions into the CAS (expand mode). */
export function imagesService(
  pulls: ImagePulls,
  policy: ImagePolicy,
  expander: ImageExpander,
  instances: InstanceNames,
  log: Logger,
): ImagesServer {
  return {
    expandImage: (call: ServerWritableStream<ExpandImageRequest, ExpandImageProgress>) => {
      let gone = false;
      // The client leaving stops the relaying only: the expansion goes on and is remembered.
      call.on("cancelled", () => {
        gone = true;
      });
      const send = (message: ExpandImageProgress) => {
        if (!gone && !call.writableEnded) call.write(message);
      };
      let sentAt = 0;
      (async () => {
        instances.check(call.request.instanceName);
        const image = await admitRequestedImage(policy, call.request.reference);
        // Credentials for a private registry come in a header only: this request has no Command to carry them.
        const credentials = registryCredentialsFrom(call.metadata).get(normalizeRegistryKey(image.registry));
        const tree = await expander.expand(call.request.instanceName, SHA256, image, credentials, (progress) => {
          // Progress comes per chunk of every layer; a few messages a second are enough for a bar.
          if (Date.now() - sentAt < PROGRESS_INTERVAL_MS) return;
          sentAt = Date.now();
          send(ExpandImageProgress.fromPartial(progress));
        });
        send(
          ExpandImageProgress.fromPartial({
            rootDirectoryDigest: { hash: tree.root.hash, sizeBytes: tree.root.sizeBytes },
            manifestDigest: tree.manifestDigest,
            reference: String(tree.reference),
          }),
        );
        if (!gone && !call.writableEnded) call.end();
      })().catch((err: unknown) => {
        logFailure(log, "ExpandImage", err);
        if (!gone) call.emit("error", toServiceError(err));
      });
    },
    pullImage: (call: ServerWritableStream<PullImageRequest, PullImageProgress>) => {
      let pull: StartedPull | undefined;
      let gone = false;
      // The client leaving stops the relaying only: the workers' pulls go on.
      call.on("cancelled", () => {
        gone = true;
        pull?.stop();
      });
      (async () => {
        instances.check(call.request.instanceName);
        pull = await pulls.start(call.request.reference, (state) => {
          if (!gone && !call.writableEnded) call.write(state);
        });
        if (gone) pull.stop();
        await pull.finished;
        if (!gone && !call.writableEnded) call.end();
      })().catch((err: unknown) => {
        logFailure(log, "PullImage", err);
        if (!gone) call.emit("error", toServiceError(err));
      });
    },
  };
}
