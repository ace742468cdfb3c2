import assert from "node:assert/strict";
import { test } from "node:test";
import { parseImageReference } from "../image/reference.js";
import { guestDockerConfig } from "./guest-dockerd.js";

const credentials = { username: "builder", password: "s3cret:with colon" };

function keys(config: string): Record<string, { auth: string }> {
  return (JSON.parse(config) as { auths: Record<string, { auth: string }> }).auths;
}

test("the guest's docker client finds the action's credentials under the key it looks them up by", () => {
  const own = keys(guestDockerConfig({ registry: "127.0.0.1:5000", ...credentials }));
  assert.deepEqual(Object.keys(own), ["127.0.0.1:5000"]);
  assert.equal(Buffer.from(own["127.0.0.1:5000"]?.auth ?? "", "base64").toString(), "builder:s3cret:with colon");
  // Docker Hub's, however the image names it, under the index URL the docker client asks for.
  for (const name of ["ubuntu:20.04", "docker.io/library/ubuntu:20.04", "index.docker.io/library/ubuntu:20.04"]) {
    const hub = keys(guestDockerConfig({ registry: parseImageReference(name).registry, ...credentials }));
    assert.deepEqual(Object.keys(hub), ["https://index.docker.io/v1/"], name);
  }
});
