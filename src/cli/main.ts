#!/usr/bin/env node
import { Command } from "commander";
import { imageCommand } from "./image.js";
import { runCommand } from "./run.js";
import { serveCommand } from "./serve.js";
import { workerCommand } from "./worker.js";

const program = new Command()
  .name("berth")
  .description("Berth: a remote build execution farm (REAPI v2) that runs actions in the container images they name")
  .version("0.1.0")
  .showHelpAfterError();

program.addCommand(serveCommand());
program.addCommand(workerCommand());
program.addCommand(runCommand());
program.addCommand(imageCommand());

await program.parseAsync(process.argv);
