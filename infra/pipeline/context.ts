import * as pulumi from "@pulumi/pulumi";
import { Plan, Stage, StageId, TRANSPORT_FILES } from "./plan";
import { Runner } from "./runner";

/**
 * What every stage component receives: the runner, the plan, and the
 * resources created so far (by stage id, and the copies of repo files), so a
 * stage's resource depends exactly on its predecessors and its own files.
 */
export class PipelineContext {
  private readonly done = new Map<StageId, pulumi.Resource>();
  private readonly copies = new Map<string, pulumi.Resource>();

  constructor(
    readonly runner: Runner,
    readonly plan: Plan,
    /** What every stage waits for besides its upstream stages (AWS: the address and the role policy). */
    readonly base: pulumi.Resource[] = [],
  ) {}

  record(id: StageId, r: pulumi.Resource): void {
    this.done.set(id, r);
  }

  recordCopy(file: string, r: pulumi.Resource): void {
    this.copies.set(file, r);
  }

  resource(id: StageId): pulumi.Resource {
    const r = this.done.get(id);
    if (!r) throw new Error(`pipeline: stage ${id} has not been created yet`);
    return r;
  }

  has(id: StageId): boolean {
    return this.done.has(id);
  }

  /** Every stage resource created so far. */
  all(): pulumi.Resource[] {
    return [...this.done.values()];
  }

  /** The resources a stage must wait for: the base, the file copy, its upstream and `after` stages. */
  dependencies(stage: Stage): pulumi.Resource[] {
    const deps: pulumi.Resource[] = [...this.base];
    // Every bounded host stage runs through stage.sh (a transport file, in no stage's files).
    const files =
      stage.hostCommand !== undefined && stage.id !== "waitHost" ? [...stage.files, ...TRANSPORT_FILES] : stage.files;
    for (const f of files) {
      const c = this.copies.get(f);
      if (c && !deps.includes(c)) deps.push(c);
    }
    for (const id of [...stage.dependsOn, ...stage.after]) if (this.done.has(id)) deps.push(this.resource(id));
    return deps;
  }
}
