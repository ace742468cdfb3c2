import { parse as parseYaml } from "yaml";
import { z } from "zod";
import type { Grant } from "./access.js";
import { PrivateFileError, readPrivateFile } from "./private-file.js";
import { SecretTable } from "./secrets.js";

/**
 * The file `auth.tokensFile` names. Tokens are listed by their SHA-256, not
 * in clear: the file is configuration (copied, backed up, read by config
 * tools), and a hash of a random token is useless to whoever reads it. It
 * must still be private (0600, see private-file.ts): a token chosen by a
 * person can be guessed from its hash offline, and the list tells who exists.
 *
 *   tokens:
 *     - name: ci                 # shown in logs instead of the token
 *       sha256: 9f86d081…        # printf %s "$TOKEN" | sha256sum
 *       instances: ["*"]         # or the instance names it may use ("" is the default one)
 */
const TokensFileSchema = z
  .object({
    tokens: z.array(
      z
        .object({
          name: z.string().min(1),
          sha256: z
            .string()
            .regex(
              /^[0-9a-fA-F]{64}$/,
              "must be the 64 hex digits of the token's SHA-256 (printf %s TOKEN | sha256sum)",
            ),
          instances: z.array(z.string()).min(1, 'list the instance names it may use, or ["*"] for all'),
        })
        .strict(),
    ),
  })
  .strict();

export class TokensFileError extends Error {}

export async function loadClientTokens(path: string): Promise<SecretTable<Grant>> {
  let raw: unknown;
  try {
    raw = parseYaml((await readPrivateFile(path, "auth.tokensFile")).toString("utf8"));
  } catch (err) {
    if (err instanceof PrivateFileError) throw err;
    throw new TokensFileError(`cannot read auth.tokensFile ${path}: ${(err as Error).message}`);
  }
  return clientTokenTable(raw, path);
}

export function clientTokenTable(raw: unknown, source: string): SecretTable<Grant> {
  const parsed = TokensFileSchema.safeParse(raw);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((issue) => `  ${issue.path.join(".") || "(top level)"}: ${issue.message}`);
    throw new TokensFileError(`invalid tokens file ${source}:\n${lines.join("\n")}`);
  }
  const table = new SecretTable<Grant>();
  for (const entry of parsed.data.tokens) {
    table.add(Buffer.from(entry.sha256, "hex"), {
      name: entry.name,
      instances: entry.instances.includes("*") ? "*" : entry.instances,
    });
  }
  return table;
}
