/** The image's variables with the command's on top: a name the command sets replaces the image's. */
export function mergeEnvironment(
  imageEnv: readonly string[],
  commandEnv: readonly { name: string; value: string }[],
): { name: string; value: string }[] {
  const overridden = new Set(commandEnv.map((v) => v.name));
  const inherited: { name: string; value: string }[] = [];
  for (const entry of imageEnv) {
    const eq = entry.indexOf("=");
    const name = eq < 0 ? entry : entry.slice(0, eq);
    if (name === "" || overridden.has(name)) continue;
    inherited.push({ name, value: eq < 0 ? "" : entry.slice(eq + 1) });
  }
  return [...inherited, ...commandEnv];
}
