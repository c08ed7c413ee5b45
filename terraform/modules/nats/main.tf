# A three-server NATS cluster, one per zone, at fixed addresses (each server's routes name the
# other two). JetStream lives on its own encrypted gp3 volume, which outlives the instance: a
# replaced server comes back with its streams. Kiln's streams are created with three replicas
# (KILN_STREAM_REPLICAS=3), so any one server may be lost or upgraded at a time.

locals {
  addresses = [for cidr in var.subnet_cidrs : cidrhost(cidr, 10)]
  device    = "/dev/sdf"
}

resource "aws_instance" "server" {
  count                       = 3
  ami                         = var.ami_id
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_ids[count.index]
  private_ip                  = local.addresses[count.index]
  vpc_security_group_ids      = [var.security_group_id]
  iam_instance_profile        = var.instance_profile
  monitoring                  = true
  ebs_optimized               = true
  user_data_replace_on_change = false
  user_data = templatefile("${path.module}/../../templates/nats.yaml.tftpl", {
    name              = var.name
    index             = count.index + 1
    region            = var.region
    peers             = [for i, address in local.addresses : address if i != count.index]
    lame_duck_s       = var.lame_duck_s
    jetstream_bytes   = floor(var.jetstream_gb * 0.9) * 1024 * 1024 * 1024
    tls_secret_arn    = var.tls_secret_arn
    server_secret_arn = var.server_secret_arn
    volume_device     = local.device
    nats_package      = var.nats_package
  })

  metadata_options {
    http_endpoint = "enabled"
    http_tokens   = "required"
  }

  root_block_device {
    volume_size = 20
    volume_type = "gp3"
    encrypted   = true
    kms_key_id  = var.kms_key_arn
  }

  tags = { Name = "${var.name}-${count.index + 1}", "kiln:part" = "nats" }

  lifecycle {
    ignore_changes = [ami] # upgrades are rolled by hand, one server at a time
  }
}

resource "aws_ebs_volume" "jetstream" {
  count             = 3
  availability_zone = aws_instance.server[count.index].availability_zone
  size              = var.jetstream_gb
  type              = "gp3"
  throughput        = 250
  encrypted         = true
  kms_key_id        = var.kms_key_arn
  tags              = { Name = "${var.name}-${count.index + 1}-jetstream" }
}

resource "aws_volume_attachment" "jetstream" {
  count       = 3
  device_name = local.device
  volume_id   = aws_ebs_volume.jetstream[count.index].id
  instance_id = aws_instance.server[count.index].id
}
