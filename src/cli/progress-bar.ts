/** What the bar of a pull shows: sums over the workers pulling (no workers for an expansion, which the server does). */
export interface PullFigures {
  bytesDone: number;
  bytesTotal: number;
  layersDone: number;
  layersTotal: number;
  workersFinished?: number;
  workersTotal?: number;
}

const BAR_MAX = 40;
const BAR_MIN = 5;

/**
 * One line, e.g. `[########------]  57%  12.3/21.5 MB  layers 3/7  workers 1/2`,
 * at most `columns - 1` wide: a terminal wraps a line that fills its last
 * column, and the next redraw would then leave the wrapped part behind.
 */
export function renderPullProgress(figures: PullFigures, columns: number): string {
  const fraction = doneFraction(figures);
  const text =
    `${`${Math.floor(fraction * 100)}%`.padStart(4)}  ` +
    `${megabytes(figures.bytesDone)}/${megabytes(figures.bytesTotal)} MB  ` +
    `layers ${figures.layersDone}/${figures.layersTotal}` +
    (figures.workersTotal === undefined ? "" : `  workers ${figures.workersFinished ?? 0}/${figures.workersTotal}`);
  const room = columns - 1;
  const barWidth = Math.min(BAR_MAX, room - text.length - 3);
  if (barWidth < BAR_MIN) return text.slice(0, Math.max(0, room));
  const filled = Math.floor(fraction * barWidth);
  return `[${"#".repeat(filled)}${"-".repeat(barWidth - filled)}] ${text}`;
}

function doneFraction(figures: PullFigures): number {
  if (figures.bytesTotal > 0) return Math.min(1, figures.bytesDone / figures.bytesTotal);
  // Nothing to download (or nothing known yet): done only when every worker is.
  if (figures.workersTotal === undefined)
    return figures.layersTotal > 0 && figures.layersDone === figures.layersTotal ? 1 : 0;
  return figures.workersTotal > 0 && figures.workersFinished === figures.workersTotal ? 1 : 0;
}

function megabytes(bytes: number): string {
  return (bytes / 1e6).toFixed(1);
}

/** A line of a terminal redrawn in place. */
export class StatusLine {
  private shown = false;

  constructor(private readonly out: NodeJS.WritableStream) {}

  draw(text: string): void {
    // Carriage return, the text, then erase what a longer earlier line left to its right.
    this.out.write(`\r${text}\x1b[K`);
    this.shown = true;
  }

  /** Erases the line, so what is written next starts on a clean one. */
  clear(): void {
    if (this.shown) this.out.write("\r\x1b[K");
    this.shown = false;
  }
}
