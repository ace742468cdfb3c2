import assert from "node:assert/strict";
import { test } from "node:test";
import { hostPlatformProperties, satisfies } from "./host-platform.js";
import { unmetProperty } from "./property.js";

const p = (name: string, value: string) => ({ name, value });

test("a Linux x86-64 worker offers OSFamily, ISA and Arch under one spelling each", () => {
  assert.deepEqual(hostPlatformProperties([], "linux", "x64"), [
    p("OSFamily", "linux"),
    p("ISA", "x86-64"),
    p("Arch", "x86-64"),
  ]);
  assert.deepEqual(hostPlatformProperties([], "linux", "arm64"), [
    p("OSFamily", "linux"),
    p("ISA", "aarch64"),
    p("Arch", "aarch64"),
  ]);
  assert.deepEqual(hostPlatformProperties([], "linux", "ppc64", "LE")[1], p("ISA", "power-isa-le"));
  assert.deepEqual(hostPlatformProperties([], "linux", "ppc64", "BE")[1], p("ISA", "power-isa-be"));
  // The worker on this machine, from process.arch.
  const own = hostPlatformProperties();
  assert.equal(own.length, 3);
  assert.equal(own[0]?.value, process.platform === "linux" ? "linux" : own[0]?.value);
});

test("an operator's own property of one of these names takes the place of the host's", () => {
  assert.deepEqual(hostPlatformProperties([p("ISA", "x86-64-v3"), p("pool", "big")], "linux", "x64"), [
    p("OSFamily", "linux"),
    p("Arch", "x86-64"),
  ]);
});

test("OSFamily, ISA and Arch match whatever the case and spelling clients use", () => {
  const offered = hostPlatformProperties([], "linux", "x64");
  for (const wanted of [
    [p("OSFamily", "Linux")],
    [p("OSFamily", "LINUX"), p("ISA", "x86-64")],
    [p("ISA", "x86_64"), p("Arch", "amd64")],
    [p("Arch", "X86_64"), p("ISA", " amd64 ")],
    [p("Arch", "x64")],
  ]) {
    assert.equal(unmetProperty(offered, wanted), undefined, JSON.stringify(wanted));
  }
  const arm = hostPlatformProperties([], "linux", "arm64");
  assert.equal(unmetProperty(arm, [p("ISA", "arm64"), p("Arch", "AArch64"), p("OSFamily", "linux")]), undefined);
});

test("another operating system or architecture is still unmet, and other properties are compared exactly", () => {
  const offered = [...hostPlatformProperties([], "linux", "x64"), p("pool", "big")];
  assert.deepEqual(unmetProperty(offered, [p("OSFamily", "Linux"), p("ISA", "aarch64")]), p("ISA", "aarch64"));
  assert.deepEqual(unmetProperty(offered, [p("ISA", "arm64")]), p("ISA", "arm64"));
  assert.deepEqual(unmetProperty(offered, [p("Arch", "x86-32")]), p("Arch", "x86-32"));
  assert.deepEqual(unmetProperty(offered, [p("OSFamily", "Windows")]), p("OSFamily", "Windows"));
  assert.deepEqual(unmetProperty(offered, [p("OSFamily", "darwin")]), p("OSFamily", "darwin"));
  // Names are not folded, and neither are the values of properties Berth does not know.
  assert.deepEqual(unmetProperty(offered, [p("osfamily", "linux")]), p("osfamily", "linux"));
  assert.deepEqual(unmetProperty(offered, [p("pool", "BIG")]), p("pool", "BIG"));
  assert.equal(satisfies(p("pool", "big"), p("pool", "big")), true);
  // An alias of one name does not satisfy another: x86-64 is not x86-32, and "x86" is 32-bit.
  assert.equal(satisfies(p("ISA", "x86-64"), p("ISA", "x86")), false);
  assert.equal(satisfies(p("ISA", "x86-64"), p("Arch", "x86-64")), false);
});
