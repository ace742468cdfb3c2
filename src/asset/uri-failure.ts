/** Why one URI gave nothing: the origin's answer, the policy's refusal, or the fetch's deadline. */
export class UriFailure extends Error {
  constructor(
    message: string,
    readonly kind: "failed" | "refused" | "timedOut" = "failed",
  ) {
    super(message);
  }
}
