# The GPU hosts: one node agent each (`python -m kiln.invoker`, as root: it makes the replicas'
# sandboxes) on the AWS Deep Learning AMI (NVIDIA driver and CUDA). An on-demand group keeps a
# warm pool of stopped instances whose EBS volumes hold the snapshot cache, so a scale-up
# starts a machine that already has the models' bytes; an optional spot group adds cheaper
# capacity. A terminating instance drains first (templates/lifecycle.py.tftpl).

data "aws_ssm_parameter" "dlami" {
  count = var.ami_id == null ? 1 : 0
  name  = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}

locals {
  ami_id = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.dlami[0].value)
  groups = merge(
    { ondemand = { min = var.min_size, max = var.max_size, warm = var.warm_pool_size, spot = false } },
    var.spot_max_size > 0 ? { spot = { min = 0, max = var.spot_max_size, warm = 0, spot = true } } : {},
  )
  watcher = "/usr/local/lib/kiln/lifecycle.py"
}

module "group" {
  source   = "../service"
  for_each = local.groups

  name          = "${var.name}-gpu-${each.key}"
  part          = "invoker"
  user          = "root"
  region        = var.region
  package       = var.package
  settings      = var.settings
  secrets       = var.secrets
  ami_id        = local.ami_id
  instance_type = var.instance_type
  # The snapshot cache: room for the models this group serves, kept across stops.
  volume_gb                  = var.cache_gb
  min_size                   = each.value.min
  max_size                   = each.value.max
  subnet_ids                 = var.subnet_ids
  security_group_id          = var.security_group_id
  instance_profile           = var.instance_profile
  stop_timeout_s             = var.drain_s + 15
  start_now                  = false # the watcher starts it once the instance is in service
  warm_pool_size             = each.value.warm
  spot                       = each.value.spot
  spot_instance_types        = concat([var.instance_type], var.spot_alternatives)
  termination_hook_timeout_s = var.drain_s + 60
  extra_files = {
    (local.watcher) = templatefile("${path.module}/../../templates/lifecycle.py.tftpl", {
      group = "${var.name}-gpu-${each.key}"
    })
    "/etc/systemd/system/kiln-lifecycle.service" = <<-UNIT
      [Unit]
      Description=Kiln node lifecycle (warm pool, drain before termination)
      After=network-online.target
      [Service]
      ExecStart=/opt/kiln/bin/python ${local.watcher}
      Restart=always
      RestartSec=5
      [Install]
      WantedBy=multi-user.target
    UNIT
  }
  extra_commands = [["systemctl", "enable", "--now", "kiln-lifecycle.service"]]
  # Replicas run sandboxed (bubblewrap, and iptables for their egress rules): docs/security.md.
  os_packages = ["bubblewrap", "iptables"]
  kms_key_arn = var.kms_key_arn
}
