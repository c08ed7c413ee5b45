# One Kiln process as a service: an Auto Scaling group of instances that run
# `python -m kiln.<part>` under systemd (templates/kiln-service.yaml.tftpl), with IMDSv2,
# encrypted volumes and the tier's role. The routers, the scheduler group and the billing
# service are instances of it.

locals {
  secrets_script = templatefile("${path.module}/../../templates/secrets.py.tftpl", {
    region                = var.region
    user                  = var.user
    kiln_secret_arn       = var.secrets.kiln
    database_secret_arn   = lookup(var.secrets, "database", "")
    database_host         = var.database_host
    redis_secret_arn      = lookup(var.secrets, "redis", "")
    redis_host            = var.redis_host
    stripe_secret_arn     = lookup(var.secrets, "stripe", "")
    nats_creds_secret_arn = var.secrets.nats_platform
  })
  user_data = templatefile("${path.module}/../../templates/kiln-service.yaml.tftpl", {
    part           = var.part
    user           = var.user
    package        = var.package
    settings       = var.settings
    secrets_script = base64encode(local.secrets_script)
    stop_timeout_s = var.stop_timeout_s
    start_now      = var.start_now
    extra_commands = var.extra_commands
    extra_files    = { for path, content in var.extra_files : path => base64encode(content) }
    packages       = concat(["python3-venv"], var.os_packages)
  })
}

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  update_default_version = true
  user_data              = base64encode(local.user_data)
  vpc_security_group_ids = [var.security_group_id]

  iam_instance_profile {
    name = var.instance_profile
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  block_device_mappings {
    device_name = var.root_device_name
    ebs {
      volume_size           = var.volume_gb
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = var.kms_key_arn
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = var.name, "kiln:part" = var.part }
  }
}

resource "aws_autoscaling_group" "this" {
  name                      = var.name
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.min_size
  vpc_zone_identifier       = var.subnet_ids
  target_group_arns         = var.target_group_arns
  health_check_type         = length(var.target_group_arns) > 0 ? "ELB" : "EC2"
  health_check_grace_period = 300
  default_instance_warmup   = 120

  dynamic "launch_template" {
    for_each = var.spot ? [] : [1]
    content {
      id      = aws_launch_template.this.id
      version = aws_launch_template.this.latest_version
    }
  }

  # Spot capacity: any of the allowed types, where the price and the capacity are best.
  dynamic "mixed_instances_policy" {
    for_each = var.spot ? [1] : []
    content {
      instances_distribution {
        on_demand_percentage_above_base_capacity = 0
        spot_allocation_strategy                 = "price-capacity-optimized"
      }
      launch_template {
        launch_template_specification {
          launch_template_id = aws_launch_template.this.id
          version            = aws_launch_template.this.latest_version
        }
        dynamic "override" {
          for_each = var.spot_instance_types
          content {
            instance_type = override.value
          }
        }
      }
    }
  }

  # Instances kept stopped, ready to start: their disks (a GPU node's snapshot cache) survive,
  # and starting one takes seconds where launching takes minutes.
  dynamic "warm_pool" {
    for_each = var.warm_pool_size > 0 ? [1] : []
    content {
      pool_state                  = "Stopped"
      min_size                    = var.warm_pool_size
      max_group_prepared_capacity = var.warm_pool_size
      instance_reuse_policy {
        reuse_on_scale_in = true
      }
    }
  }

  # An instance on its way out waits for its process to drain and say so.
  dynamic "initial_lifecycle_hook" {
    for_each = var.termination_hook_timeout_s == null ? [] : [1]
    content {
      name                 = "drain"
      lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
      heartbeat_timeout    = var.termination_hook_timeout_s
      default_result       = "CONTINUE"
    }
  }

  # New launch templates (a new Kiln version) roll out a few instances at a time; each old one
  # gets SIGTERM and drains within TimeoutStopSec before it goes.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 66
      instance_warmup        = 120
    }
  }

  tag {
    key                 = "kiln:part"
    value               = var.part
    propagate_at_launch = true
  }
}
