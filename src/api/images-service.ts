import type { ServerWritableStream } from "@grpc/grpc-js";
import type { ImagePulls, StartedPull } from "../execution/image-pulls.js";
import type { ImagesServer, PullImageProgress, PullImageRequest } from "../gen/berth/image/v1/image.js";
import type { Logger } from "../log/log.js";
import { Code, StatusError } from "../status/status.js";
import { toServiceError } from "./grpc-status.js";
import { logFailure } from "./handlers.js";
import type { InstanceNames } from "./instance-names.js";

/** berth.image.v1.Images: streams each worker's progress of a pull until all have finished. */
export function imagesService(pulls: ImagePulls, instances: InstanceNames, log: Logger): ImagesServer {
  return {
    expandImage: (call) => {
      call.emit("error", toServiceError(new StatusError(Code.UNIMPLEMENTED, "ExpandImage is not implemented yet")));
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
