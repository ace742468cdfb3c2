import type { ActionPlatform } from "../action/action-platform.js";
import { formatProperty } from "../action/property.js";
import { Code, StatusError } from "../status/status.js";

/**
 * The farm's refusal of actions asking for a network (execution.allowNetwork:
 * false): FAILED_PRECONDITION with a violation naming the property that asks.
 */
export function refuseNetwork(platform: ActionPlatform): void {
  const asking = platform.networkProperty;
  if (!asking) return;
  const property = formatProperty(asking);
  throw new StatusError(
    Code.FAILED_PRECONDITION,
    `platform property ${property} asks for a network, and this farm runs actions without one ` +
      "(execution.allowNetwork: false); remove the property",
    {
      preconditionFailures: [
        {
          type: "NETWORK_NOT_ALLOWED",
          subject: property,
          description: "this farm runs actions without a network (execution.allowNetwork: false)",
        },
      ],
    },
  );
}
