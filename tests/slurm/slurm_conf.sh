# The slurm.conf lines both test clusters share, sourced by cluster.sh (one node on localhost) and multinode.sh
# (nodes in network namespaces on a bridge). Each script writes its own header, node lines and the values below.
# Needs STATE_DIR, LOG_DIR and GRACE_TIME set by the sourcing script.

# conf_body CTL_HOST CTL_ADDR SLURMD_SUFFIX DEF_MEM_PER_CPU SLURMD_TIMEOUT: everything but the nodes and partitions.
# SLURMD_SUFFIX names each slurmd's spool, pid and log file ("" for one node, "-%n" for several on one machine).
conf_body() {
    local host=$1 addr=$2 sfx=$3 def_mem=$4 slurmd_timeout=$5
    cat <<EOF
ClusterName=ddpmtest
SlurmctldHost=$host($addr)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# credential lifetime; also how long a requeued job waits (BeginTime) before it may start again: 11 s
# (default 120 s; Slurm's minimum is 5; tests skip the wait with slurm_helpers.release_requeued)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd$sfx
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd$sfx.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd$sfx.log
SlurmctldDebug=info
SlurmdDebug=info
# scheduling: react at once to submissions and completions
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
# finished jobs stay visible to \`scontrol show job\` for 5 min (there is no sacct to ask afterwards)
MinJobAge=300
KillWait=5
InactiveLimit=0
WaitTime=0
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=$slurmd_timeout
MessageTimeout=10
JobRequeue=1
# Preemption the way a university cluster does it: a job of a higher PriorityTier partition takes the CPUs of
# a running job; that job gets SIGCONT+SIGTERM, GraceTime seconds, then SIGTERM+SIGKILL (after KillWait),
# and is requeued (REQUEUE) or cancelled (CANCEL) by slurmctld.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
}

# conf_partitions NODES: the four partitions over NODES (a comma-separated list)
conf_partitions() {
    local nodes=$1
    cat <<EOF
# debug: the default, preempted with requeue after a grace time; urgent: the higher-priority jobs that preempt;
# cancel: preempted jobs are cancelled; nopreempt: never preempted (a cluster without preemption)
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=urgent Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
PartitionName=cancel Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL GraceTime=$GRACE_TIME
PartitionName=nopreempt Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
EOF
}
